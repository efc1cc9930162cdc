"""Points where whoever calls `launch.train` can act inside every Train worker. A run started by the CLI passes
none, so these no-ops are all that runs; the fault tests pass their own (tests/faults.py): fail after a step,
stop inside a checkpoint to be killed, record the trained model's logits for export to be checked against.
"""

from __future__ import annotations

from typing import Callable


class WorkerHooks:
    """Called on every rank; subclass and override what you need (it is pickled to the workers). For a step with
    a checkpoint, `checkpoint_uploaded` comes before that step's `after_step`."""

    def after_step(self, step: int, rank: int) -> None:
        """After optimizer step `step` (1-based) and its checkpoint, if one was due."""

    def checkpoint_uploaded(self, step: int, rank: int) -> None:
        """Every rank's files of checkpoint `step` are in storage; rank 0 has not yet verified them."""

    def finished(self, forward: Callable, rows, rank: int, device) -> None:
        """Training is over. `forward(batch) -> logits` runs the trained model (collectively: call it on every
        rank); `rows` are the prepared training rows."""
