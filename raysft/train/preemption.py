"""The preemption notice, seen from the training loop: when a node of the run is drained for preemption (a spot
reclaim, `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, `ray start --block` on SIGTERM as KubeRay sends
it), the workers checkpoint at once and train on until the node is gone; where the deadline leaves room, once more
just before it. The restart that follows resumes from that checkpoint: nothing before the notice is trained twice.

Ray Train 2.60 tells every worker through `ray.train.get_preemption_info()`, a barrier every rank must call equally
often (an RPC to the run's synchronization actor, per rank). So rank 0's clock decides when to ask, and the decision
rides on the per-step all-reduce the loop does anyway (`votes()` summed over ranks, as `report.ReportGate` does):
every rank asks at the same step, at most every `RAYSFT_PREEMPTION_ASK_S` seconds (2 s; Ray's watcher polls the
drain table every 5 s, `RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`), and the same votes decide the last save before the
deadline. `Loop.end_step` turns a notice into a due checkpoint; the hf backend's Trainer saves it like any other.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

ASK_S = "RAYSFT_PREEMPTION_ASK_S"
ASK_DEFAULT_S = 2.0


def nodes(info) -> str:
    """The preempted nodes and their workers, from a `ray.train.PreemptionInfo`.

    >>> from types import SimpleNamespace
    >>> nodes(SimpleNamespace(preempted_node_to_ranks={"3f2a9c1e04bd77aa": [1]}))
    'node 3f2a9c1e04bd (worker 1)'
    """
    return "; ".join(f"node {node[:12]} ({'worker' if len(r) == 1 else 'workers'} {', '.join(map(str, sorted(r)))})"
                     for node, r in sorted(info.preempted_node_to_ranks.items()))


def seconds_left(info, now: Optional[float] = None) -> Optional[float]:
    return None if not info.deadline_ms else info.deadline_ms / 1000 - (time.time() if now is None else now)


class Preemption:
    """One worker's view of the run's preemption notices (see the module's doc)."""

    def __init__(self, rank: int, log: Callable[[str], None]):
        self.rank, self.log = rank, log
        self.interval = float(os.environ.get(ASK_S, ASK_DEFAULT_S))
        self.asked = 0.0
        self.info = None  # the notice acted on
        self.last_save_s: Optional[float] = None  # how long the last checkpoint took, due to committed
        self.step_s: Optional[float] = None  # the last step's time
        self.final_done = True
        self.ask_s: list[float] = []  # what each ask cost (rank 0), for the end-of-run line

    def votes(self) -> tuple[float, float]:
        """Rank 0's votes (ask now, save now: the last chance before the deadline); 0 on the other ranks."""
        if self.rank != 0:
            return 0.0, 0.0
        now = time.time()
        ask = float(now - self.asked >= self.interval)
        left = seconds_left(self.info, now) if self.info is not None and not self.final_done else None
        last = left is not None and self.last_save_s is not None and self.step_s is not None and \
            self.last_save_s < left <= self.last_save_s + 2 * self.step_s
        return ask, float(last)

    def check(self, step: int, ask: float, last: float, step_s: float, periodic: bool) -> bool:
        """After the all-reduce of the votes, on every rank: whether step `step` checkpoints because of a notice."""
        self.step_s = step_s
        if ask > 0:
            import ray.train

            t0 = time.time()
            info = ray.train.get_preemption_info()  # a barrier: every rank calls it at this step
            self.asked = time.time()
            self.ask_s.append(self.asked - t0)
            key = None if info is None else (info.preempted_node_to_ranks, info.deadline_ms)
            if info is not None and (self.info is None or key != (self.info.preempted_node_to_ranks,
                                                                   self.info.deadline_ms)):
                second = self.info is not None
                self.info, self.final_done = info, False
                left = seconds_left(info)
                deadline = f"deadline in {left:.0f} s" if left is not None else "no deadline given"
                risk = (f"; the last checkpoint took {self.last_save_s:.1f} s, more than the deadline leaves: "
                        "saving anyway (the previous checkpoint stays the fallback)"
                        if left is not None and self.last_save_s is not None and self.last_save_s > left else "")
                self.log(f"preemption: {'another notice: ' if second else ''}{nodes(info)} is being preempted "
                         f"({deadline}); checkpoint at step {step} now"
                         f"{' (the periodic one of this step)' if periodic else ''}{risk}")
                return True
        if last > 0:
            self.final_done = True
            self.log(f"preemption: {seconds_left(self.info):.0f} s to the deadline; one more checkpoint at step "
                     f"{step}, the last before it")
            return True
        return False

    def saved(self, step: int, seconds: float, because_of_notice: bool) -> None:
        """A checkpoint at `step` was committed, `seconds` after it fell due."""
        self.last_save_s = seconds
        if because_of_notice and self.info is not None:
            left = seconds_left(self.info)
            self.log(f"preemption: checkpoint at step {step} saved in {seconds:.1f} s"
                     + (f", {left:.0f} s before the deadline" if left is not None and left >= 0 else
                        f", {-left:.0f} s after the deadline" if left is not None else ""))

    def summary(self) -> Optional[str]:
        """The asks' cost, for rank 0's last line (None when it never asked)."""
        if not self.ask_s:
            return None
        mean = sum(self.ask_s) / len(self.ask_s)
        return f"preemption: asked Ray {len(self.ask_s)} times, {1000 * mean:.1f} ms each on average"
