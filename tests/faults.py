"""Fault injection and probes for the training tests, passed to `launch.train(..., hooks=...)`: they run inside the
Ray Train workers through the `WorkerHooks` points, and are no part of a shipped run.

This module is pickled by value (workers cannot import tests/), so it imports only what workers have.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import ray.cloudpickle

from raysft.train.hooks import WorkerHooks

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBE_TOKENS = 64
PAUSE_S = 300  # long enough for the test to kill the paused process


@dataclass
class Faults(WorkerHooks):
    """`fail_after_step` (and each of `fail_after_steps`): rank `rank` raises after that step, once (a marker file in
    `marker_dir` remembers it). `pause_in_checkpoint_step`: rank `rank` holds still after every rank uploaded that
    checkpoint's files and before rank 0 verified them, its pid in `{marker_dir}/.paused-in-checkpoint-step{N}`,
    to be killed. `probe`: at the end, the trained model's logits of the first row's first tokens go to this file,
    for export to be checked against. `dynamo_stats`: at the end, rank 0's torch.compile counters go to this file."""

    marker_dir: str = ""
    fail_after_step: int = 0
    fail_after_steps: tuple = ()  # more steps to fail after, each once (an attempt resumed past one fails at the next)
    pause_in_checkpoint_step: int = 0
    rank: int = 0
    probe: str = ""
    dynamo_stats: str = ""
    notice_after_step: int = 0  # rank `rank` writes its node's id to {marker_dir}/.notice-node (the node to preempt);
    # rank 0 then waits for {marker_dir}/.drained (the driver drained it), so the next step sees the notice
    pause_after_step: int = 0  # rank `rank` holds still after that step, once: until its node is gone

    def __post_init__(self):
        if (self.fail_after_step or self.fail_after_steps or self.pause_in_checkpoint_step or self.notice_after_step
                or self.pause_after_step) and not os.path.isabs(
                self.marker_dir):
            raise ValueError("Faults: give marker_dir, an absolute folder every worker sees (e.g. cfg.output_dir)")

    def after_step(self, step: int, rank: int) -> None:
        if step in (self.fail_after_step, *self.fail_after_steps) and step and rank == self.rank:
            marker = os.path.join(self.marker_dir, f".injected-failure-step{step}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError(f"raysft test: injected failure after step {step}")

        if step == self.notice_after_step:
            self._notice(rank)
        if step == self.pause_after_step and rank == self.rank:
            marker = os.path.join(self.marker_dir, f".paused-after-step{step}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(PAUSE_S)

    def _notice(self, rank: int) -> None:
        node = os.path.join(self.marker_dir, ".notice-node")
        if rank == self.rank and not os.path.exists(node):
            with open(node + ".tmp", "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
            os.replace(node + ".tmp", node)
        seen = os.path.join(self.marker_dir, ".notice-seen")
        if rank == 0 and not os.path.exists(seen):
            deadline = time.time() + 120
            while not os.path.exists(os.path.join(self.marker_dir, ".drained")) and time.time() < deadline:
                time.sleep(0.1)
            open(seen, "w").close()

    def checkpoint_uploaded(self, step: int, rank: int) -> None:
        if self.pause_in_checkpoint_step == step and rank == self.rank:
            marker = os.path.join(self.marker_dir, f".paused-in-checkpoint-step{step}")
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(PAUSE_S)

    def finished(self, forward, rows, rank: int, device) -> None:
        if self.dynamo_stats and rank == 0:  # how many graphs torch.compile made in this worker
            import json

            from torch._dynamo.utils import counters

            with open(self.dynamo_stats, "w") as f:
                json.dump(dict(counters["stats"]), f)
        if not self.probe:
            return
        import torch

        ids = torch.tensor([rows.get([0])["input_ids"][0][:PROBE_TOKENS]], device=device)
        with torch.no_grad():  # every rank: ZeRO-3 gathers parameters collectively
            logits = forward({"input_ids": ids, "position_ids": torch.arange(ids.shape[1], device=device)[None]})
        if rank == 0:
            torch.save({"input_ids": ids.cpu(), "logits": logits.float().cpu()}, self.probe)


def load_probe(path: str) -> dict:
    import torch

    return torch.load(path, weights_only=True)
