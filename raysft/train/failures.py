"""Why Ray Train restarted the workers, said in one console line.

The workers' output stays in Ray's logs (see `console.py`), and a worker that died says nothing itself; Ray Train's
controller sees the failure. `FailureLines` is a Ray Train callback that runs there and appends one line per
failure to `{output_dir}/console.log`, which the driver prints: which ranks failed, Ray's reason (the process died,
ran out of memory, lost its node, or raised; "out of memory" put first when Ray says so), and whether the workers
restart from the last checkpoint.

A node drained for preemption (a spot reclaim, `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, KubeRay's
SIGTERM to `ray start --block`) is not a failure: Ray Train restarts the workers against
`FailureConfig.max_preemption_failures` (`cluster.max_preemption_failures`), a budget of its own. `PreemptionLines`
follows the controller's states and says the notice (which node, which workers, the deadline) and the restart,
counted against that budget; `FailureLines` leaves a preempted worker's error to it.
"""

from __future__ import annotations

import os
import re

from ray.train import PreemptionError, UserCallback

# Ray Train 2.60 has no public callback that sees the controller's states (the notice, and a restart whose
# workers all returned, reach no UserCallback): ControllerCallback and the state classes are its DeveloperAPI
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    PreemptingState,
    RestartingState,
    ShuttingDownState,
)

from raysft.console import CONSOLE_FILE
from raysft.train.preemption import nodes

MAX_CHARS = 240


def cause(exc: BaseException) -> str:
    """What happened, in Ray's words, on one line: the exception's type and its first meaningful line, and for a
    failed health check the reason Ray gives for the dead worker (its process died, its node died).

    >>> cause(RuntimeError("\\nboom\\n  at line 3"))
    'RuntimeError: boom'
    >>> cause(RuntimeError("Task was killed due to the node running low on memory."))
    'RuntimeError: out of memory: Task was killed due to the node running low on memory.'
    >>> class HealthCheck(Exception):
    ...     health_check_failure = RuntimeError("The actor died.\\n The actor is dead because its node has died. Id 1")
    >>> cause(HealthCheck("A worker health check failed."))
    'HealthCheck: A worker health check failed. The actor is dead because its node has died.'
    """
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    inner = getattr(exc, "health_check_failure", None)
    if inner is not None:
        why = re.search(r"The actor is dead because[^.]*\.", str(inner))
        inner_first = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
        first = f"{first} {why.group(0) if why else f'{type(inner).__name__}: {inner_first}'.rstrip(': ')}"
    lowered = (text + str(inner or "")).lower()
    if "out of memory" in lowered or "outofmemory" in lowered or "low on memory" in lowered:
        first = "out of memory: " + first
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 3] + "..."


class FailureLines(UserCallback):
    """On Ray Train's controller: one console line per worker-group failure."""

    def __init__(self, output_dir: str, max_failures: int):
        self.path = os.path.join(output_dir, CONSOLE_FILE)
        self.max_failures = max_failures
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        if any(preempted(e) for e in worker_exceptions.values()):
            return  # a preemption, not a failure: PreemptionLines says it, against its own budget
        self.failures += 1
        ranks = sorted(worker_exceptions)
        left = self.max_failures - self.failures
        then = (f"restarting the workers from the last checkpoint (restart {self.failures} of "
                f"{self.max_failures})" if left >= 0 or self.max_failures < 0 else
                f"no restarts left (cluster.max_failures={self.max_failures}): the run stops")
        which = f"worker {ranks[0]}" if len(ranks) == 1 else f"workers {', '.join(map(str, ranks))}"
        append(self.path, f"train: {which} failed ({cause(worker_exceptions[ranks[0]])}); {then}")


def append(path: str, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError:
        pass  # the controller's own log still has it


def preempted(exc: BaseException) -> bool:
    """Whether a worker's error is its node's preemption (Ray's `RayActorError.preempted`, inside a failed health
    check): Ray sets it when a node drained for preemption goes away after its deadline."""
    return bool(getattr(getattr(exc, "health_check_failure", exc), "preempted", False))


class PreemptionLines(ControllerCallback):
    """On Ray Train's controller: one console line when a node of the run is drained for preemption (the notice:
    which node and workers, the deadline), and one when the run restarts because of it (or stops, its budget spent),
    counted against `cluster.max_preemption_failures`."""

    def __init__(self, output_dir: str, max_preemption_failures: int):
        self.path = os.path.join(output_dir, CONSOLE_FILE)
        self.budget, self.restarts, self.notice = max_preemption_failures, 0, None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        import time

        if isinstance(current_state, PreemptingState):
            info = current_state.preemption_info
            if (info.preempted_node_to_ranks, info.deadline_ms) != self.notice:
                self.notice = (info.preempted_node_to_ranks, info.deadline_ms)
                left = (f"its deadline in {max(0, info.deadline_ms / 1000 - time.time()):.0f} s"
                        if info.deadline_ms else "no deadline given")
                append(self.path, f"train: {nodes(info)} is being preempted, {left}: the workers checkpoint at their "
                                  "next step and train on until it is gone")
            return
        error = getattr(current_state, "training_failed_error", None)
        stopping = isinstance(current_state, ShuttingDownState)
        if stopping:
            error = getattr(current_state.next_state, "training_failed_error", None)
        if not isinstance(current_state, RestartingState) and not stopping:
            return
        failures = getattr(error, "worker_failures", {}) or {}
        if not (isinstance(error, PreemptionError) or any(preempted(e) for e in failures.values())):
            return
        self.notice = None
        info = getattr(error, "preemption_info", None)
        which = nodes(info) if info is not None else "its node"
        how = " (Ray Train stopped the workers at the deadline)" if getattr(error, "drain_timed_out", False) else ""
        budget = "unlimited" if self.budget < 0 else str(self.budget)
        if stopping:
            append(self.path, f"train: {which} preempted{how}; no preemption restarts left "
                              f"(cluster.max_preemption_failures={self.budget}): the run stops")
            return
        self.restarts += 1
        append(self.path, f"train: {which} preempted{how}; restarting the workers from the last checkpoint "
                          f"(preemption restart {self.restarts} of {budget}, cluster.max_preemption_failures)")
