"""The checkpoint folder contract: its entries, its state, commit, verify, prune. The one place that knows the
layout (train/resize.py converts a checkpoint for another worker count through the paths named here):

    checkpoint_{step:08d}/
      model/               backend-native state: DeepSpeed's checkpoint folder (`latest`, `step{N}/`, the
                           model's config.json), the fsdp backend's DCP checkpoint (`.metadata`,
                           `__{rank}_0.distcp`, config.json), or the TRL Trainer's own checkpoint folder; every
                           rank's files
      rng/rank{r}.pt       each rank's RNG states (deepspeed and fsdp; the Trainer keeps its own in model/)
      state.json           `RunState`: step, epoch, samples and tokens seen, seed, data fingerprint, world size, ...
      config.yaml          the resolved config
      tokenizer/           the tokenizer the rows were made with
      files.rank{r}.json   the files rank r wrote, with sizes and sha256
      manifest.json        every file with size and sha256; written last, after Ray committed the checkpoint

Every rank writes its own files into a local folder and reports it; Ray Train merges the ranks' folders in
storage and commits the checkpoint once every rank has reported. Only then does rank 0 check the ranks'
file lists against storage and write `manifest.json`. A folder without a valid manifest is not a checkpoint:
`latest_good` skips it (with a warning naming it) and falls back to the previous one.
Storage is any path or URI pyarrow reads (`raysft.storage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import pyarrow.fs as pafs

from raysft import storage

MODEL, RNG, STATE, CONFIG = "model", "rng", "state.json", "config.yaml"
TOKENIZER, MANIFEST = "tokenizer", "manifest.json"
LATEST = "latest"  # DeepSpeed's file in model/ naming the tag it saved
NAME = re.compile(r"^checkpoint_(\d{8})$")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own list of a run's checkpoints


def dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def deepspeed_tag(step: int) -> str:
    """The tag the deepspeed backend saves its engine under, in model/."""
    return f"step{step}"


def run_dir(storage_path: str, run_name: str) -> str:
    """The folder in storage that holds a run's checkpoints (Ray Train's `storage_path/name`)."""
    return os.path.join(storage_path, run_name)


def model_dir(path: str) -> str:
    """model/ of the checkpoint at `path`: the backend's own state."""
    return os.path.join(path, MODEL)


def deepspeed_dir(path: str, step: int) -> str:
    """The deepspeed backend's engine state of step `step` in the checkpoint at `path`."""
    return os.path.join(path, MODEL, deepspeed_tag(step))


@dataclass(frozen=True)
class RunState:
    """state.json: where a run stands at a checkpoint."""

    step: int
    epoch: int
    samples_seen: int
    tokens_seen: int
    seed: int
    fingerprint: str  # of the prepared data (data/prepared.py)
    world_size: int
    total_steps: int
    global_batch_size: int
    final: bool
    backend: str = "deepspeed"  # the defaults read checkpoints written before these fields existed
    zero_stage: int = 0
    lora: bool = False
    tracking: dict = dataclasses.field(default_factory=dict)  # {mlflow|wandb: run id}: a resumed run continues it
    samples_seen_by_source: dict = dataclasses.field(default_factory=dict)  # {data.sources name: rows seen}

    @classmethod
    def from_json(cls, raw: dict) -> "RunState":
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


# ------------------------------------------------------------------ writing (inside Ray Train workers)


def save_rng(local: str, rank: int) -> None:
    """This rank's Python, NumPy, torch (and CUDA) RNG states, into rng/rank{r}.pt."""
    import random

    import numpy as np
    import torch

    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    os.makedirs(os.path.join(local, RNG), exist_ok=True)
    torch.save(state, os.path.join(local, RNG, f"rank{rank}.pt"))


def restore_rng(path: str, rank: int) -> None:
    """The RNG states `save_rng` wrote for this rank, if there are any."""
    import random

    import numpy as np
    import torch

    file = os.path.join(path, RNG, f"rank{rank}.pt")
    if not os.path.exists(file):
        return
    state = torch.load(file, weights_only=True)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_run_files(local: str, state: RunState, config_yaml: str, tokenizer_dir: str) -> None:
    """Rank 0's part of a checkpoint besides the model: state.json, the resolved config, the tokenizer."""
    with open(os.path.join(local, STATE), "w", encoding="utf-8") as f:
        f.write(state.to_json())
    with open(os.path.join(local, CONFIG), "w", encoding="utf-8") as f:
        f.write(config_yaml)
    shutil.copytree(tokenizer_dir, os.path.join(local, TOKENIZER))


def list_files(local_dir: str) -> list[dict]:
    """Every file under a local folder, relative path, size and sha256, sorted."""
    fs = pafs.LocalFileSystem()
    out = []
    for root, _, files in os.walk(local_dir):
        for name in files:
            full = os.path.join(root, name)
            out.append({"path": os.path.relpath(full, local_dir), "bytes": os.path.getsize(full),
                        "sha256": storage.sha256(fs, full)})
    return sorted(out, key=lambda f: f["path"])


def write_rank_files(local_dir: str, rank: int) -> None:
    """The list of what this rank wrote; the last file it writes before reporting."""
    files = list_files(local_dir)  # before the listing itself exists
    with open(os.path.join(local_dir, f"files.rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "files": files}, f, indent=1)


def _read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def commit(path: str, world_size: int) -> dict:
    """After Ray committed the checkpoint at `path`: check every rank's files are there, write the manifest."""
    fs, root = storage.filesystem(path)
    files = []
    for rank in range(world_size):
        files += _read_json(fs, f"{root}/files.rank{rank}.json")["files"]
    seen = {}
    for f in files:
        if f["path"] in seen and seen[f["path"]] != f["sha256"]:
            raise RuntimeError(f"{path}: two ranks wrote different {f['path']}")
        seen[f["path"]] = f["sha256"]
        info = fs.get_file_info(f"{root}/{f['path']}")
        if info.type != pafs.FileType.File or info.size != f["bytes"]:
            raise RuntimeError(f"{path}: {f['path']} is missing or has the wrong size after upload")
    manifest = {"world_size": world_size, "files": sorted({f["path"]: f for f in files}.values(),
                                                          key=lambda f: f["path"])}
    with fs.open_output_stream(f"{root}/{MANIFEST}.tmp") as out:
        out.write(json.dumps(manifest, indent=1).encode())
    fs.move(f"{root}/{MANIFEST}.tmp", f"{root}/{MANIFEST}")
    return manifest


# ------------------------------------------------------------------ reading (driver, workers, export)


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None when the checkpoint at `path` is whole, else why not."""
    fs, root = storage.filesystem(path)
    try:
        manifest = _read_json(fs, f"{root}/{MANIFEST}")
    except (OSError, ValueError) as exc:
        return f"no valid {MANIFEST} ({type(exc).__name__})"
    for f in manifest.get("files", []):
        full = f"{root}/{f['path']}"
        info = fs.get_file_info(full)
        if info.type != pafs.FileType.File:
            return f"{f['path']} is missing"
        if info.size != f["bytes"]:
            return f"{f['path']} has {info.size} bytes, the manifest says {f['bytes']} (truncated?)"
        if checksums and storage.sha256(fs, full) != f["sha256"]:
            return f"{f['path']} does not match its sha256 checksum"
    return None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder under the run's storage folder, newest first."""
    fs, root = storage.filesystem(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        m = NAME.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), storage.scheme(run_dir) + info.path))
    return sorted(found, reverse=True)


def latest_good(run_dir: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """The newest checkpoint that verifies; every newer one that does not is named in a warning."""
    for _, path in list_checkpoints(run_dir):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"checkpoint: skipping {path}: {problem}")
    return None


def read_state(path: str) -> RunState:
    fs, root = storage.filesystem(path)
    return RunState.from_json(_read_json(fs, f"{root}/{STATE}"))


def read_config(path: str) -> dict:
    """The resolved config the checkpoint at `path` was written under (its config.yaml), as a dict."""
    import yaml

    fs, root = storage.filesystem(path)
    with fs.open_input_stream(f"{root}/{CONFIG}") as f:
        return yaml.safe_load(f.read().decode("utf-8")) or {}


def prune(run_dir: str, keep: int, log: Callable[[str], None] = print) -> list[str]:
    """Keep the newest `keep` good checkpoints; delete the rest (older ones, and broken ones), return them.

    Called by rank 0 right after it committed a checkpoint, so the newest good checkpoint is the one just
    committed and is never deleted. (Ray Train's own `num_to_keep` would delete the previous checkpoint as soon
    as a new one is *reported*, before raysft has verified it: a crash in between could leave none.)
    """
    fs, _ = storage.filesystem(run_dir)
    kept, deleted = 0, []
    for _, path in list_checkpoints(run_dir):
        if kept < keep and verify(path, checksums=False) is None:
            kept += 1
            continue
        fs.delete_dir(storage.filesystem(path)[1])
        deleted.append(path)
    if deleted:
        log(f"checkpoint: removed {len(deleted)} older or incomplete checkpoint(s), keeping {kept}")
    return deleted


def forget_ray_snapshot(run_dir: str) -> bool:
    """Delete Ray Train's checkpoint list of the run before a new driver starts it again; True when there was one.

    raysft prunes checkpoints after verifying newer ones (`prune`), so Ray's list can name folders that are gone,
    and Ray Train then refuses to start the run ("The run snapshot contains a reference to a checkpoint that does
    not exist anymore"). Without the list Ray starts with a clean state, which it supports; raysft resumes from its
    own verified checkpoints (`latest_good`), never from Ray's list.
    """
    fs, root = storage.filesystem(run_dir)
    path = f"{root}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    fs.delete_file(path)
    return True
