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
