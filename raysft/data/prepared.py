"""The prepared-dataset contract: its folder layout, fingerprint, manifest and row schema, and the rows
memory-mapped for training. The one place that knows the layout:

    {output_dir}/prepared/{fingerprint[:16]}/
      train/*.parquet      training rows (`ROW_SCHEMA`), in input order
      eval/*.parquet       eval rows (data.eval_files, or records held out by data.eval_fraction)
      tokenizer/           the tokenizer the rows were made with (ChatML tokens added)
      rejects.jsonl        rejected records, with on_bad_record=skip
      manifest.json        fingerprint, counts, token statistics, settings, inputs; written last
      {split}-arrow/       `datasets`' memory-mapped Arrow cache of a split, made by the first worker

A prepared folder is made aside (`{final}.tmp-*`) and renamed into place after its manifest is written, so
one with a manifest is always whole. Its name is its fingerprint: the same inputs, data settings and
tokenizer are never prepared twice.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa

FORMAT = 2  # bump when the rows' meaning changes: it is part of the fingerprint (2: the source column)
TRAIN, EVAL, TOKENIZER, MANIFEST, REJECTS = "train", "eval", "tokenizer", "manifest.json", "rejects.jsonl"
LIST_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")
ROW_SCHEMA = pa.schema([(c, pa.list_(pa.int32())) for c in LIST_COLUMNS]
                       + [("num_tokens", pa.int32()), ("num_trained", pa.int32()), ("source", pa.int16())])


def short(fingerprint: str) -> str:
    """The fingerprint as folder names and messages show it."""
    return fingerprint[:16]


def location(prepared_path: str, fingerprint: str) -> str:
    """The prepared dataset of `fingerprint` under `data.prepared_path`."""
    return os.path.join(prepared_path, short(fingerprint))


def fingerprint(inputs: dict, settings: dict, tokenizer_sha256: str) -> str:
    """What the rows depend on: the inputs' bytes, the data settings, the tokenizer's files, the format."""
    parts = {"format": FORMAT, "inputs": inputs, "settings": settings, "tokenizer": tokenizer_sha256}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def hash_dir(path: str) -> str:
    """sha256 over a flat folder's file names and bytes (a saved tokenizer)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def read_manifest(prepared_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(prepared_dir, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def has_eval(manifest: dict) -> bool:
    return bool(manifest.get("eval") and manifest["eval"]["rows"])


def split_statistics(prepared_dir: str, split: str, max_seq_len: int) -> dict:
    """Rows, tokens, padding and example lengths of one split's Parquet files, for the manifest."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(split_dir(prepared_dir, split), "*.parquet")))
    table = pa.concat_tables([pq.read_table(f, columns=["num_tokens", "num_trained", "seq_lengths"]) for f in files]) \
        if files else ROW_SCHEMA.empty_table()
    rows = len(table)
    lengths = np.asarray(table["seq_lengths"].combine_chunks().flatten(), dtype=np.int64) if rows else np.zeros(0)
    tokens = int(np.sum(table["num_tokens"])) if rows else 0
    return {
        "rows": rows, "tokens": tokens, "trained_tokens": int(np.sum(table["num_trained"])) if rows else 0,
        "padding_fraction": round(1 - tokens / (rows * max_seq_len), 6) if rows else 0.0,
        "example_tokens": {"mean": round(float(lengths.mean()), 2) if len(lengths) else 0,
                           "p50": int(np.percentile(lengths, 50)) if len(lengths) else 0,
                           "p95": int(np.percentile(lengths, 95)) if len(lengths) else 0,
                           "max": int(lengths.max()) if len(lengths) else 0},
        "files": [{"path": os.path.relpath(f, prepared_dir), "rows": pq.ParquetFile(f).metadata.num_rows}
                  for f in files],
    }


def summary(manifest: dict) -> str:
    """The lines `prepare` prints about a prepared dataset."""
    m = manifest
    lines = [f"records: {m['records_read']} read, {m['records_kept']} kept, {m['records_rejected']} rejected"
             + (f", {m['records_held_out']} held out for eval" if m.get("records_held_out") else "")
             + (f", {m['records_filtered']} left out by data.where" if m.get("records_filtered") else "")
             + (f" {m['rejected_by_reason']}" if m["rejected_by_reason"] else ""),
             f"examples: {m['examples_truncated']} truncated, {m['examples_dropped']} dropped "
             "(longer than max_seq_len)" + (
                 f"; {m['prompt_over_max_seq_len']} of them a prompt alone of max_seq_len tokens or more (the "
                 f"longest: {m['longest_prompt']['tokens']} tokens, {m['longest_prompt']['where']}): raise "
                 "data.max_seq_len to train them" if m.get("prompt_over_max_seq_len") else ""),
             f"rows: {m['rows']}, tokens: {m['tokens']}, trained tokens: {m['trained_tokens']}, "
             f"padding: {m['padding_fraction']:.2%}",
             f"example tokens: {m['example_tokens']}"]
    if m.get("eval"):
        e = m["eval"]
        lines.append(f"eval: {e['records_kept']} records, {e['rows']} rows, {e['tokens']} tokens")
    if m.get("rejects_file"):
        lines.append(f"rejected lines written to {m['rejects_file']}")
    return "\n".join(lines)


def tokenizer_dir(prepared_dir: str) -> str:
    return os.path.join(prepared_dir, TOKENIZER)


def split_dir(prepared_dir: str, split: str) -> str:
    """A split's Parquet folder."""
    return os.path.join(prepared_dir, split)


def tokenizer_class(tokenizer) -> str:
    """``module:class`` of a tokenizer transformers made ("" for remote code), to load its saved copy with."""
    cls = type(tokenizer)
    return f"{cls.__module__}:{cls.__qualname__}" if cls.__module__.startswith("transformers.") else ""


def saved_tokenizer(prepared_dir: str, class_path: str = ""):
    """The tokenizer the rows were made with; as the class `class_path` names (`tokenizer_class`) when given.

    `AutoTokenizer` imports torch (transformers' configuration classes do), 1.7 s of each Ray worker's first prepare
    task on 2 cores for nothing: a prepare task loads the driver's own tokenizer class, which does not.
    """
    if class_path:
        import importlib

        module, name = class_path.split(":")
        return getattr(importlib.import_module(module), name).from_pretrained(tokenizer_dir(prepared_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(prepared_dir))


class PreparedRows:
    """One split's rows, memory-mapped, indexed by row id (what the schedule hands out).

    `datasets` turns the prepared Parquet into Arrow files once (cached beside the Parquet, guarded by its
    file lock when several workers start together) and memory-maps them, so a worker's memory does not grow
    with the dataset and any row is a cheap random access.
    """

    def __init__(self, prepared_dir: str, split: str = TRAIN):
        import datasets

        files = sorted(glob.glob(os.path.join(split_dir(prepared_dir, split), "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{prepared_dir}/{split}: no prepared Parquet files")
        datasets.disable_progress_bars()
        self.ds = datasets.Dataset.from_parquet(files, cache_dir=os.path.join(prepared_dir, f"{split}-arrow"))
        self.num_tokens = np.asarray(self.ds["num_tokens"], dtype=np.int64)
        self.num_trained = np.asarray(self.ds["num_trained"], dtype=np.int64)
        self.source = np.asarray(self.ds["source"], dtype=np.int64)  # index into source_names
        self.source_names = [x["name"] for x in (read_manifest(prepared_dir) or {}).get("sources") or []] or ["train"]

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, ids: list[int]) -> dict:
        """Rows `ids` as a dict of lists (input_ids, labels, position_ids, ...), in the order asked."""
        return self.ds[ids]
