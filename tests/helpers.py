"""Plain helpers for tests: paths, JSONL writing, tiny run configs, and the training tests' shared pieces (the run
config of the reference run, its weights, a run on a helper thread, the bit-identical comparison)."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")
# set by conftest for the session: "prepared", the data.prepared_path training runs share (each dataset prepared once)
SHARED: dict = {}


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


def run_config(tmp_path, model_dir, name, shared_prepared=True, **sections):
    """The reference run's config (conftest's `reference`: 6 steps of 8 rows on 2 workers, ZeRO-2, a checkpoint
    every 2 steps), `sections` merged over it per section; its prepared data in the session's shared folder."""
    from raysft.config import load_config

    cfg = base_config(tmp_path / name, model_dir, SAMPLE)
    cfg["data"].update({"max_seq_len": 256, **sections.get("data", {})})
    if shared_prepared and SHARED.get("prepared"):
        cfg["data"].setdefault("prepared_path", SHARED["prepared"])
    cfg["train"] = {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 6, "lr": 3e-3, "dtype": "fp32",
                    "zero_stage": 2, "warmup_steps": 1, "log_every_steps": 1, **sections.get("train", {})}
    cfg["checkpoint"] = {"every_steps": 2, "keep": 2, **sections.get("checkpoint", {})}
    cfg["cluster"] = {"num_workers": 2, "max_failures": 1, **sections.get("cluster", {})}
    for key in set(sections) - {"data", "train", "checkpoint", "cluster"}:
        cfg[key] = {**cfg.get(key, {}), **sections[key]} if isinstance(sections[key], dict) else sections[key]
    cfg["run_name"] = "run"
    return load_config(config_file(tmp_path, cfg, f"{name}.yaml"))


def weights(final_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(final_dir, "model.safetensors"))


def train_in_thread(cfg, hooks=None):
    """`launch.train` on a helper thread (the test kills a process meanwhile): (thread, {"result" | "error"})."""
    import threading

    from raysft.train.launch import train

    outcome = {}

    def run():
        try:
            outcome["result"] = train(None, [], cfg=cfg, log=lambda s: None, hooks=hooks)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for(predicate, thread=None, timeout=300, proc=None):
    """Until `predicate()`; fails when the training thread (or process) ended first, or after `timeout` s."""
    import time

    deadline = time.time() + timeout
    while not predicate():
        alive = (thread is None or thread.is_alive()) and (proc is None or proc.poll() is None)
        assert alive and time.time() < deadline, "training ended or hung before the moment to kill"
        time.sleep(0.2)


def assert_same_as_reference(reference, cfg, result):
    """The same per-step losses as the reference run, and bit-identical final weights."""
    import torch

    from raysft.train.metrics import read_metrics

    ref_cfg, ref = reference
    assert [m["loss"] for m in read_metrics(cfg.output_dir)] == [m["loss"] for m in read_metrics(ref_cfg.output_dir)]
    a, b = weights(ref["final"]), weights(result["final"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
