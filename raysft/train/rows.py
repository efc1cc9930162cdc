"""The prepared rows, memory-mapped, indexed by row id (what the schedule hands out).

`datasets` turns the prepared Parquet into Arrow files once (cached beside the Parquet, guarded by its
file lock when several workers start together) and memory-maps them, so a worker's memory does not grow
with the dataset and any row is a cheap random access.
"""

from __future__ import annotations

import glob
import os

import numpy as np


class PreparedRows:
    def __init__(self, prepared_dir: str, split: str = "train"):
        import datasets

        files = sorted(glob.glob(os.path.join(prepared_dir, split, "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{prepared_dir}/{split}: no prepared Parquet files")
        datasets.disable_progress_bars()
        self.ds = datasets.Dataset.from_parquet(files, cache_dir=os.path.join(prepared_dir, f"{split}-arrow"))
        self.num_tokens = np.asarray(self.ds["num_tokens"], dtype=np.int64)
        self.num_trained = np.asarray(self.ds["num_trained"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, ids: list[int]) -> dict:
        """Rows `ids` as a dict of lists (input_ids, labels, position_ids, ...), in the order asked."""
        return self.ds[ids]
