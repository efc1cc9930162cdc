"""What a person sees: raysft's own lines and progress, not Ray's, DeepSpeed's and transformers' internals.

- Rank 0 of the Train workers writes its lines (setup, steps, checkpoints, resume) to `{output_dir}/console.log`
  (`WorkerConsole`); the driver tails that file and prints each line once (`Feed`). Ray's forwarding of every
  worker's output to the driver is off unless `--verbose` (or `RAYSFT_VERBOSE=1`), so nothing else from the
  workers reaches the console; Ray's own logs stay in its log folder, whose path raysft prints once.
- In a terminal, `train` shows a progress bar (tqdm: step, rate, ETA, loss) with the other lines above it, and
  `prepare` a bar of chunks done; in a file or CI, the plain lines.
- The driver's libraries are quieted (`quiet`): FutureWarnings and DeprecationWarnings, and the INFO logs of
  DeepSpeed, transformers and datasets. Warnings and errors still show.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from typing import Callable, Optional

VERBOSE_ENV = "RAYSFT_VERBOSE"
CONSOLE_FILE = "console.log"
POLL_S = 0.2
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.]+)")
QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "transformers", "datasets", "torch.distributed", "filelock", "urllib3")
# Ray's driver-side chatter that raysft says in its own words (its auth line, its progress bars), or that is
# internal (Ray Data's execution plan, Train's reports); errors still show
QUIET_RAY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.air", "ray._private.authentication")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


def is_terminal(stream=None) -> bool:
    return bool(getattr(stream or sys.stdout, "isatty", lambda: False)())


def quiet() -> None:
    """Quiet the driver's libraries (not under --verbose)."""
    if verbose():
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' shard bars at export
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    quiet_ray()


def quiet_ray() -> None:
    """Ray's own driver-side loggers to ERROR (not under --verbose); again after Ray Data configures its logging."""
    if verbose():
        return
    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class WorkerConsole:
    """Rank 0's console lines, appended to {output_dir}/console.log for the driver to print (other ranks: none)."""

    def __init__(self, output_dir: str, rank: int):
        self.path = os.path.join(output_dir, CONSOLE_FILE) if rank == 0 else None

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg.rstrip("\n") + "\n")


class Feed:
    """The driver's view of console.log while training runs: each new line printed once (a terminal gets the step
    lines as a tqdm bar, the others above it). Use as a context manager around `TorchTrainer.fit()`."""

    def __init__(self, output_dir: str, out: Callable[[str], None] = print, terminal: Optional[bool] = None):
        self.path = os.path.join(output_dir, CONSOLE_FILE)
        self.out = out
        self.terminal = is_terminal() if terminal is None else terminal
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self.stop = threading.Event()
        self.bar = None
        self.thread = threading.Thread(target=self._run, name="raysft-console", daemon=True)

    def __enter__(self) -> "Feed":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self._drain()  # whatever came after the last poll
        if self.bar is not None:
            self.bar.close()

    def _run(self) -> None:
        while not self.stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            text = f.read()
        end = text.rfind("\n") + 1  # whole lines only: a line still being written waits for the next poll
        self.offset += len(text[:end].encode("utf-8"))
        for line in text[:end].splitlines():
            self._show(line)

    def _show(self, line: str) -> None:
        step = STEP_LINE.match(line)
        if not self.terminal:
            self.out(line)
            return
        from tqdm import tqdm

        if step:
            n, total, loss = int(step.group(1)), int(step.group(2)), float(step.group(3))
            if self.bar is None:
                self.bar = tqdm(total=total, initial=n - 1, unit="step", dynamic_ncols=True, desc="train")
            self.bar.update(n - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f}")
            return
        (self.bar.write if self.bar is not None else self.out)(line)


class ChunkProgress:
    """`prepare`'s progress in a terminal: chunks done (the tasks' stats files) of all chunks, as a tqdm bar."""

    def __init__(self, count_done: Callable[[], int], total: int, desc: str):
        self.count_done, self.total, self.desc = count_done, total, desc
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raysft-prepare-progress", daemon=True)

    def __enter__(self) -> "ChunkProgress":
        if is_terminal() and self.total:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self.total, unit="chunk", desc=self.desc, dynamic_ncols=True) as bar:
            while True:
                bar.update(min(self.count_done(), self.total) - bar.n)
                if self.stop.wait(POLL_S):
                    bar.update(min(self.count_done(), self.total) - bar.n)
                    return

