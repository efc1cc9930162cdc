"""This rank's micro-batches, step after step in the schedule's order, collated ahead of the training loop.

A background thread reads each step's rows from the memory-mapped prepared rows, collates them, pins them (CUDA)
and starts their copy to the device (`non_blocking`), up to `depth` steps ahead, so the loop waits on data only
when the thread falls behind. With `depth=0` the same work happens on the loop's thread, when asked. Either way
the batches are the same tensors in the same order (tested), so resume stays exact.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from raysft.train.schedule import BatchShape, Schedule


@dataclass
class StepBatches:
    step: int  # 1-based optimizer step
    n_trained: int  # trained tokens of the whole global batch: the loss's denominator
    micro_batches: list  # this rank's collated micro-batches (dicts of tensors on the device)
    wait: float = 0.0  # seconds the loop waited for them


_END = object()


class Prefetcher:
    def __init__(self, rows, schedule: Schedule, rank: int, shape: BatchShape, start_step: int, pad_id: int, device,
                 depth: int, multiple: int = 1, flat: bool = False):
        self.rows, self.schedule, self.rank, self.shape = rows, schedule, rank, shape
        self.start_step, self.pad_id, self.device, self.depth = start_step, pad_id, device, depth
        self.multiple = multiple  # the rows' length is padded to a multiple of it (sequence parallelism)
        self.flat = flat  # each micro-batch as one row (modeling.flatten: flash-attention)
        self._stop = threading.Event()

    def make(self, step: int) -> StepBatches:
        """Step `step`'s batches (what the thread does for each step)."""
        from raysft.modeling import collate

        pin = getattr(self.device, "type", str(self.device)) == "cuda"
        batches = []
        for micro in self.schedule.rank_micro_batches(step - 1, self.rank, self.shape):
            batch = collate(self.rows.get(micro), self.pad_id, multiple=self.multiple, flat=self.flat)
            if pin:
                batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
            else:
                batch = {k: v.to(self.device) for k, v in batch.items()}
            batches.append(batch)
        n_trained = int(self.rows.num_trained[self.schedule.global_batch(step - 1)].sum())
        return StepBatches(step, n_trained, batches)

    def __iter__(self) -> Iterator[StepBatches]:
        steps = range(self.start_step + 1, self.schedule.total_steps + 1)
        if self.depth == 0:
            for step in steps:
                t0 = time.time()
                item = self.make(step)
                item.wait = time.time() - t0
                yield item
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        thread = threading.Thread(target=self._fill, args=(q, steps), name="raysft-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.time()
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                item.wait = time.time() - t0
                yield item
        finally:
            self._stop.set()
            while thread.is_alive():  # unblock a thread waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.1)

    def _fill(self, q: queue.Queue, steps) -> None:
        try:
            for step in steps:
                if self._stop.is_set():
                    return
                q.put(self.make(step))
            q.put(_END)
        except BaseException as exc:  # handed to the loop, which raises it
            q.put(exc)
