"""A ZeRO checkpoint written by N workers made loadable by M: DeepSpeed's universal checkpoint, converted once.

Called by the driver (launch.py) when a fixed worker count differs from the checkpoint's, and by rank 0 of
the deepspeed backend when an elastic run restarts on another size. The converted folder goes under
output_dir, which every node sees, keyed by the checkpoint's name, so it is converted at most once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from raysft import checkpoint as ckpt
from raysft.errors import UserError, format_error


@dataclass(frozen=True)
class Universal:
    """Where the universal form of `checkpoint` is: DeepSpeed loads tag `tag` from folder `load_dir`."""

    checkpoint: str
    load_dir: str
    tag: str


def location(good: str, state: ckpt.RunState, output_dir: str) -> Universal:
    return Universal(checkpoint=good, load_dir=os.path.join(output_dir, "universal", os.path.basename(good)),
                     tag=f"{ckpt.deepspeed_tag(state.step)}_universal")


def to_universal(good: str, state: ckpt.RunState, output_dir: str, workers: int,
                 log: Callable[[str], None]) -> Universal:
    """Convert checkpoint `good` (unless already converted); its location."""
    where = location(good, state, output_dir)
    target = os.path.join(where.load_dir, where.tag)
    if os.path.exists(os.path.join(target, "zero")):
        return where
    log(f"train: {good} was written by {state.world_size} workers, resuming on {workers}: "
        f"converting it to DeepSpeed's universal checkpoint in {target}")
    os.makedirs(where.load_dir, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           ckpt.deepspeed_dir(good, state.step), "--output_folder",
                           target + ".tmp", "--num_extract_workers", "1", "--num_merge_workers", "1",
                           "--inject_missing_state"],
                          capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        raise UserError(format_error("cluster.num_workers", f"{good} was written by {state.world_size} workers "
                                     "and DeepSpeed could not convert it for another count", workers,
                                     f"resume with cluster.num_workers={state.world_size}, or export it "
                                     f"(raysft export) and start a new run from the exported model ({last})"))
    os.replace(target + ".tmp", target)
    return where
