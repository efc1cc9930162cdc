"""The checkpoint folder contract: write, commit, verify, find the latest good one. The one place that knows it.

    checkpoint_{step:08d}/
      model/               backend-native state (DeepSpeed: its checkpoint folder, every rank's files)
      rng/rank{r}.pt       each rank's RNG states
      state.json           step, epoch, samples and tokens seen, seed, data fingerprint, world size, backend
      config.yaml          the resolved config
      tokenizer/           the tokenizer the rows were made with
      files.rank{r}.json   the files rank r wrote, with sizes and sha256
      manifest.json        every file with size and sha256; written last, after Ray committed the checkpoint

Every rank writes its own files into a local folder and reports it; Ray Train merges the ranks' folders in
storage and commits the checkpoint once every rank has reported. Only then does rank 0 check the ranks'
file lists against storage and write `manifest.json`. A folder without a valid manifest is not a checkpoint:
`latest_good` skips it (with a warning naming it) and falls back to the previous one.
Storage is any path or URI pyarrow reads (local, NFS, s3://, gs://).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Optional

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
STATE = "state.json"
NAME = re.compile(r"^checkpoint_(\d{8})$")


def dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _fs(path: str):
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def list_files(local_dir: str) -> list[dict]:
    """Every file under a local folder, relative path, size and sha256, sorted."""
    fs = pafs.LocalFileSystem()
    out = []
    for root, _, files in os.walk(local_dir):
        for name in files:
            full = os.path.join(root, name)
            out.append({"path": os.path.relpath(full, local_dir), "bytes": os.path.getsize(full),
                        "sha256": _sha256(fs, full)})
    return sorted(out, key=lambda f: f["path"])


def write_rank_files(local_dir: str, rank: int) -> None:
    """The list of what this rank wrote; the last file it writes before reporting."""
    files = list_files(local_dir)
    with open(os.path.join(local_dir, f"files.rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "files": files}, f, indent=1)


def _read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def commit(path: str, world_size: int) -> dict:
    """After Ray committed the checkpoint at `path`: check every rank's files are there, write the manifest."""
    fs, root = _fs(path)
    files = []
    for rank in range(world_size):
        listing = _read_json(fs, f"{root}/files.rank{rank}.json")
        files += listing["files"]
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


def verify(path: str, checksums: bool = True) -> Optional[str]:
    """None when the checkpoint at `path` is whole, else why not."""
    fs, root = _fs(path)
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
        if checksums and _sha256(fs, full) != f["sha256"]:
            return f"{f['path']} does not match its sha256 checksum"
    return None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder under the run's storage folder, newest first."""
    fs, root = _fs(run_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        m = NAME.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            prefix = run_dir.split("://")[0] + "://" if "://" in run_dir else ""
            found.append((int(m.group(1)), prefix + info.path))
    return sorted(found, reverse=True)


def latest_good(run_dir: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """The newest checkpoint that verifies; every newer one that does not is named in a warning."""
    for _, path in list_checkpoints(run_dir):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"checkpoint: skipping {path}: {problem}")
    return None


def prune(run_dir: str, keep: int, log: Callable[[str], None] = print) -> list[str]:
    """Keep the newest `keep` good checkpoints; delete the rest (older ones, and broken ones), return them.

    Called by rank 0 right after it committed a checkpoint, so the newest good checkpoint is the one just
    committed and is never deleted. (Ray Train's own `num_to_keep` would delete the previous checkpoint as soon
    as a new one is *reported*, before raysft has verified it: a crash in between could leave none.)
    """
    fs, _ = _fs(run_dir)
    kept, deleted = 0, []
    for _, path in list_checkpoints(run_dir):
        if kept < keep and verify(path, checksums=False) is None:
            kept += 1
            continue
        fs.delete_dir(_fs(path)[1])
        deleted.append(path)
    if deleted:
        log(f"checkpoint: removed {len(deleted)} older or incomplete checkpoint(s), keeping {kept}")
    return deleted


def read_state(path: str) -> dict:
    fs, root = _fs(path)
    return _read_json(fs, f"{root}/{STATE}")


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own list of a run's checkpoints


def forget_ray_snapshot(run_dir: str) -> bool:
    """Delete Ray Train's checkpoint list of the run before a new driver starts it again; True when there was one.

    raysft prunes checkpoints after verifying newer ones (`prune`), so Ray's list can name folders that are gone,
    and Ray Train then refuses to start the run ("The run snapshot contains a reference to a checkpoint that does
    not exist anymore"). Without the list Ray starts with a clean state, which it supports; raysft resumes from its
    own verified checkpoints (`latest_good`), never from Ray's list.
    """
    fs, root = _fs(run_dir)
    path = f"{root}/{RAY_SNAPSHOT}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    fs.delete_file(path)
    return True
