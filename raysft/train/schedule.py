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
>>> s.rank_micro_batches(0, rank=1, world_size=2, micro_batch_size=1) == [[r] for r in s.global_batch(0)[2:]]
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

    def rank_micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's rows of step `step`, as micro-batches (gradient accumulation = their count)."""
        per_rank = self.global_batch_size // world_size
        mine = self.global_batch(step)[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
