"""The deterministic global batch schedule: which prepared rows form global step k, and each rank's part.

The rows of step k are a pure function of (seed, epoch, k, global batch size): a seeded permutation of all
rows per epoch, cut into consecutive global batches; the last partial batch of an epoch is left out (it is
different rows each epoch). A rank takes a contiguous slice of the global batch and cuts it into
micro-batches. Neither the number of workers nor timing changes which rows a step trains on, so a run that
restarts after a failure, even on another number of workers, continues on the exact next sample.

>>> s = Schedule(num_rows=10, global_batch_size=4, seed=0, epochs=2)
>>> s.steps_per_epoch, s.total_steps
(2, 4)
>>> sorted(s.global_batch(0) + s.global_batch(1)) == sorted(set(s.global_batch(0) + s.global_batch(1)))
True
>>> shape = BatchShape(global_batch_size=4, micro_batch_size=1, world_size=2)
>>> shape.per_rank, shape.accumulation
(2, 2)
>>> s.rank_micro_batches(0, rank=1, shape=shape) == [[r] for r in s.global_batch(0)[2:]]
True
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_rows: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_rows))


@dataclass(frozen=True)
class BatchShape:
    """How a global batch is cut: the one place that computes per-rank rows and gradient accumulation."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int

    @property
    def rows_per_pass(self) -> int:
        """Rows of one forward pass on every worker together."""
        return self.micro_batch_size * self.world_size

    @property
    def divides(self) -> bool:
        """Whether the global batch is a whole number of passes (checked by the config)."""
        return self.global_batch_size % self.rows_per_pass == 0

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // self.rows_per_pass


@dataclass(frozen=True)
class Schedule:
    num_rows: int
    global_batch_size: int
    seed: int
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs x steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        """Row ids of global step `step` (0-based), in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(self.seed, epoch, self.num_rows)
        return list(perm[k * self.global_batch_size:(k + 1) * self.global_batch_size])

    def rank_micro_batches(self, step: int, rank: int, shape: BatchShape) -> list[list[int]]:
        """This rank's rows of step `step` (0-based), as `shape.accumulation` micro-batches."""
        if shape.global_batch_size != self.global_batch_size:
            raise ValueError(f"{shape} does not cut this schedule's global batch of {self.global_batch_size}")
        n, micro = shape.per_rank, shape.micro_batch_size
        mine = self.global_batch(step)[rank * n:(rank + 1) * n]
        return [mine[i:i + micro] for i in range(0, n, micro)]
