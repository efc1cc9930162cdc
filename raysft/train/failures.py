"""Why Ray Train restarted the workers, said in one console line.

The workers' output stays in Ray's logs (see `console.py`), and a worker that died says nothing itself; Ray Train's
controller sees the failure. `FailureLines` is a Ray Train callback that runs there and appends one line per
failure to `{output_dir}/console.log`, which the driver prints: which ranks failed, Ray's reason (the process died,
ran out of memory, lost its node, or raised; "out of memory" put first when Ray says so), and whether the workers
restart from the last checkpoint.
"""

from __future__ import annotations

import os
import re

from ray.train import UserCallback

from raysft.console import CONSOLE_FILE

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
        self.failures += 1
        ranks = sorted(worker_exceptions)
        left = self.max_failures - self.failures
        then = (f"restarting the workers from the last checkpoint (restart {self.failures} of "
                f"{self.max_failures})" if left >= 0 or self.max_failures < 0 else
                f"no restarts left (cluster.max_failures={self.max_failures}): the run stops")
        which = f"worker {ranks[0]}" if len(ranks) == 1 else f"workers {', '.join(map(str, ranks))}"
        line = f"train: {which} failed ({cause(worker_exceptions[ranks[0]])}); {then}"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass  # the controller's own log still has the failure
