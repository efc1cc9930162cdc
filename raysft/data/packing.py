"""Examples -> training rows: fit to max_seq_len, then pack best-fit-decreasing, or one example per row.

A packed row is the concatenation of whole examples with `position_ids` restarting at 0 at each
example and `seq_lengths` listing them, so attention can be kept inside each example. Nothing is lost
or duplicated: the rows' tokens are exactly the examples' tokens (tested as an invariant).
This module imports neither ray nor torch.

TRL has the same packer (`trl.data_utils._pack_bfd`), but it is private, imports torch and silently
drops empty examples; this one is small, pure, and its row count is tested against TRL's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional, Sequence


def fit_length(ids: list, labels: list, max_len: int, policy: str) -> Optional[tuple[list, list]]:
    """The example cut to `max_len` (policy "truncate") or None (policy "drop") when longer.

    >>> fit_length([1, 2, 3], [1, 2, 3], 2, "truncate")
    ([1, 2], [1, 2])
    >>> fit_length([1, 2, 3], [1, 2, 3], 2, "drop") is None
    True
    """
    if len(ids) <= max_len:
        return ids, labels
    if policy == "drop":
        return None
    return ids[:max_len], labels[:max_len]


def bfd_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins of total length <= capacity.

    Longest first, each into the fullest bin it still fits; ties keep input order, so the result is
    deterministic.

    >>> bfd_bins([5, 3, 4, 2, 1], 6)
    [[0, 4], [2, 3], [1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens > capacity {capacity}; fit_length first")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


@dataclass
class Rows:
    """Column-wise training rows (what goes into Parquet)."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    position_ids: list[list[int]] = field(default_factory=list)
    seq_lengths: list[list[int]] = field(default_factory=list)

    def add(self, examples: Sequence[tuple[list, list]]) -> None:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for ex_ids, ex_labels in examples:
            ids.extend(ex_ids)
            labels.extend(ex_labels)
            positions.extend(range(len(ex_ids)))
        self.input_ids.append(ids)
        self.labels.append(labels)
        self.position_ids.append(positions)
        self.seq_lengths.append([len(e[0]) for e in examples])


def make_rows(examples: Sequence[tuple[list, list]], max_seq_len: int, packing: bool) -> Rows:
    """Examples (already fit to max_seq_len) -> rows: packed BFD, or one per row (padded at batch time).

    >>> rows = make_rows([([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5])], 8, packing=True)
    >>> rows.input_ids, rows.position_ids, rows.seq_lengths
    ([[1, 2, 3, 4, 5]], [[0, 1, 2, 0, 1]], [[3, 2]])
    """
    rows = Rows()
    if packing:
        for b in bfd_bins([len(e[0]) for e in examples], max_seq_len):
            rows.add([examples[i] for i in b])
    else:
        for e in examples:
            rows.add([e])
    return rows
