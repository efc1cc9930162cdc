"""Prefetching hands the loop the same batches, in the schedule's order, as collating on the loop's thread."""

import threading

import numpy as np
import pytest
import torch

from raysft.train.prefetch import Prefetcher
from raysft.train.schedule import BatchShape, Schedule


class Rows:
    """The part of PreparedRows the prefetcher reads: `get(ids)` and `num_trained`."""

    def __init__(self, n=40, seed=0, fail_on=None):
        rng = np.random.default_rng(seed)
        self.data = []
        for _ in range(n):
            k = int(rng.integers(4, 20))
            ids = rng.integers(1, 300, k).tolist()
            self.data.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "position_ids": list(range(k))})
        self.num_trained = np.array([len(r["input_ids"]) - 3 for r in self.data])
        self.fail_on = fail_on

    def get(self, ids):
        if self.fail_on in ids:
            raise OSError(f"row {self.fail_on}: read failed")
        return {k: [self.data[i][k] for i in ids] for k in ("input_ids", "labels", "position_ids")}


def consume(prefetcher):
    return [(item.step, item.n_trained, item.micro_batches) for item in prefetcher]


@pytest.mark.parametrize("start_step", [0, 3])
def test_prefetched_batches_equal_the_loop_thread_batches(start_step):
    rows, schedule = Rows(), Schedule(num_rows=40, global_batch_size=8, seed=1, epochs=2)
    shape = BatchShape(8, 2, 2)
    for rank in (0, 1):
        plain = consume(Prefetcher(rows, schedule, rank, shape, start_step, 0, torch.device("cpu"), depth=0))
        ahead = consume(Prefetcher(rows, schedule, rank, shape, start_step, 0, torch.device("cpu"), depth=3))
        assert [s for s, _, _ in plain] == list(range(start_step + 1, schedule.total_steps + 1))
        assert len(plain) == len(ahead)
        for (s1, n1, b1), (s2, n2, b2) in zip(plain, ahead):
            assert s1 == s2 and n1 == n2 == int(rows.num_trained[schedule.global_batch(s1 - 1)].sum())
            assert len(b1) == len(b2) == shape.accumulation
            for x, y in zip(b1, b2):
                assert x.keys() == y.keys()
                for k in x:
                    assert torch.equal(x[k], y[k])
        # and they are this rank's rows of the schedule, collated
        first = plain[0][2][0]
        want = schedule.rank_micro_batches(start_step, rank, shape)[0]
        assert first["input_ids"][0, :len(rows.data[want[0]]["input_ids"])].tolist() == rows.data[want[0]]["input_ids"]


def test_a_read_error_in_the_thread_reaches_the_loop():
    schedule = Schedule(num_rows=40, global_batch_size=8, seed=1)
    bad_row = schedule.global_batch(2)[0]
    got = []

    def loop():
        for item in Prefetcher(Rows(fail_on=bad_row), schedule, 0, BatchShape(8, 8, 1), 0, 0, "cpu", depth=2):
            got.append(item.step)

    with pytest.raises(OSError, match=f"row {bad_row}: read failed"):
        loop()
    assert got == [1, 2]


def test_leaving_the_loop_early_stops_the_thread():
    schedule = Schedule(num_rows=40, global_batch_size=4, seed=1, epochs=5)
    for item in Prefetcher(Rows(), schedule, 0, BatchShape(4, 2, 1), 0, 0, "cpu", depth=2):
        if item.step == 2:
            break
    assert not any(t.name == "raysft-prefetch" for t in threading.enumerate())
