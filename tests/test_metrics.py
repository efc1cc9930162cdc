"""Per-step metrics (train/metrics.StepMetrics): the rows seen per data source continue from the restored
checkpoint's counts; only a checkpoint written before they were kept is replayed from the schedule."""

from types import SimpleNamespace

import numpy as np

from raysft.train.metrics import StepMetrics
from raysft.train.schedule import Schedule

CONFIG = SimpleNamespace(num_hidden_layers=2, hidden_size=64)


class Rows:
    """The part of PreparedRows StepMetrics reads: tokens per row and each row's source."""

    def __init__(self, n=40):
        self.num_tokens = np.full(n, 10)
        self.source = np.arange(n) % 2
        self.source_names = ["a", "bee"]


class CountingSchedule(Schedule):
    """A schedule that counts the global batches asked for (a replay asks for every step before the restart)."""

    asked: list

    def global_batch(self, step):
        self.asked.append(step)
        return super().global_batch(step)


def schedule():
    s = CountingSchedule(num_rows=40, global_batch_size=8, seed=3, epochs=3)
    object.__setattr__(s, "asked", [])
    return s


def counts_after(metrics, steps):
    for step in steps:
        metrics(step, 1.0, 100.0, 0.0, 1.0, 1e-3, 1.0)
    return metrics.seen_by_source()


def test_rows_per_source_continue_from_the_restored_counts_without_replaying_the_schedule():
    rows = Rows()
    fresh = StepMetrics(schedule(), rows, 2, 1000, CONFIG, None)
    at_5 = counts_after(fresh, range(1, 6))
    assert sum(at_5.values()) == 40 and at_5 == {"a": 20, "bee": 20}  # rows 0..39 once: a permutation
    s = schedule()
    resumed = StepMetrics(s, rows, 2, 1000, CONFIG, None, start_step=5, samples_seen=40, tokens_seen=400,
                          seen_by_source=at_5)
    assert s.asked == []  # nothing replayed
    assert counts_after(resumed, range(6, 9)) == counts_after(fresh, range(6, 9))


def test_a_checkpoint_without_counts_is_replayed_and_only_rank_0_counts():
    rows = Rows()
    reference = counts_after(StepMetrics(schedule(), rows, 2, 1000, CONFIG, None), range(1, 8))
    s = schedule()
    old = StepMetrics(s, rows, 2, 1000, CONFIG, None, start_step=5, samples_seen=40, tokens_seen=400,
                      seen_by_source={})  # written before samples_seen_by_source existed
    assert s.asked == [0, 1, 2, 3, 4]
    assert counts_after(old, range(6, 8)) == reference
    s = schedule()
    other_rank = StepMetrics(s, rows, 2, 1000, CONFIG, None, start_step=5, samples_seen=40, tokens_seen=400,
                             seen_by_source={}, rank=1)
    assert s.asked == [] and counts_after(other_rank, [6]) == {}
    assert other_rank.samples_seen == 48  # what every rank logs is still counted
