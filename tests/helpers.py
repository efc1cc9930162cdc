"""Plain helpers for tests: paths, JSONL writing, tiny run configs."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, records, raw_lines=()):
    """Records as JSONL, then any raw (possibly broken) lines."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def base_config(tmp_path, model_dir, train_files, **sections):
    """A config dict for a tiny run; `sections` override keys per section (data=..., train=...)."""
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"train_files": train_files, "max_seq_len": 256},
        "model": {"name_or_path": model_dir, "from_scratch": True},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 4, "lr": 1e-3, "dtype": "fp32"},
        "cluster": {"num_workers": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.__setitem__(section, values)
    return cfg


def config_file(tmp_path, cfg, name="config.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def wandb_records(path):
    """The records of a W&B run file (run-ID.wandb: a 7-byte header, then LevelDB-log blocks of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or the LAST piece of a record
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_history(folder):
    """Each offline W&B run folder under `folder`, oldest first: {id, config, history} (values parsed)."""
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "offline-run-*", "run-*.wandb"))):
        run = {"id": None, "config": {}, "history": []}
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"] = r.run.run_id
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.history.item})
        out.append(run)
    return out
