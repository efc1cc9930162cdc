"""`data.sources`: several datasets mixed by weight, at prepare time.

Each source's share of the training examples is its weight's share of all weights. With N training records over
all sources, a source of n records gets N x w / W examples: each of its records is used `ratio = N w / (W n)`
times. The whole part of the ratio repeats every record; the fraction picks that share of the records. Which
records is decided per record from the seed, the file's name and the record's line (or row) number alone, so it
does not depend on how the input was cut into chunks or which task read it, and the same seed always gives the same
rows. The pick is exact up to a few records per file: a record's line number is mapped, through a seeded
permutation within blocks of `BLOCK` lines, onto a golden-ratio sequence, and a record is picked when its point
falls below the fraction (an equidistributed sequence: any `k` consecutive points put `fraction x k` points, give or
take a few, below it).

`data.train_files` (or `data.hf_dataset`) is the one-source shorthand: ratio 1, every record once.
This module imports neither ray nor torch.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import os

import numpy as np

SOURCE_KEYS = ("name", "files", "hf_dataset", "hf_split", "weight", "columns", "system_message", "eval_fraction",
               "json_field", "where", "transcript_roles")
# a source's own value overrides data.* of that name
PER_SOURCE_SETTINGS = ("columns", "system_message", "eval_fraction", "hf_split", "where", "transcript_roles")
BLOCK = 64  # lines per seeded permutation: a stratified sample, exact to a record or two per block
GOLDEN = (math.sqrt(5) - 1) / 2


def source_name(source: dict, index: int) -> str:
    """A source's name: its own, else its first file's or dataset's name without extension."""
    if source.get("name"):
        return str(source["name"])
    first = (source.get("files") or [source.get("hf_dataset") or f"source{index}"])[0]
    base = os.path.basename(str(first).rstrip("/"))
    for ext in (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".parquet"):
        base = base[: -len(ext)] if base.endswith(ext) else base
    return base or f"source{index}"


def sources_of(data) -> list[dict]:
    """`data.sources`, or the one source `data.train_files` / `data.hf_dataset` make: each with its name, files,
    hf_dataset, hf_split and weight filled in (names made unique)."""
    raw = data.sources or [{"files": list(data.train_files), "hf_dataset": data.hf_dataset, "weight": 1.0}]
    out, seen = [], set()
    for i, s in enumerate(raw):
        files = s.get("files") or []
        name = source_name({**s, "files": [files] if isinstance(files, str) else files}, i)
        while name in seen:
            name = f"{name}-{i}"
        seen.add(name)
        out.append({**s, "name": name, "files": [files] if isinstance(files, str) else list(files),
                    "hf_dataset": s.get("hf_dataset") or "", "hf_split": s.get("hf_split", data.hf_split),
                    "json_field": s.get("json_field", data.json_field),
                    "weight": float(s.get("weight", 1.0))})
    return out


def check_sources(data, bad) -> None:
    """data.sources' config problems, through `bad(key, what, got, fix)` (config/checks.py)."""
    if not data.sources:
        return
    if data.train_files or data.hf_dataset:
        bad("data.sources", "set together with data.train_files or data.hf_dataset", len(data.sources),
            "give the training data one way: as data.sources, or data.train_files (one source)")
    for i, s in enumerate(data.sources):
        key = f"data.sources[{i}]"
        for k in s:
            if k not in SOURCE_KEYS:
                close = difflib.get_close_matches(str(k), SOURCE_KEYS, n=1)
                bad(f"{key}.{k}", "is not a source key", k,
                    (f"did you mean {close[0]}? " if close else "") + f"use: {', '.join(SOURCE_KEYS)}")
        if bool(s.get("files")) == bool(s.get("hf_dataset")):
            bad(key, "needs files or hf_dataset (one of them)", sorted(s), "add files: [data/a.jsonl] (paths, globs or "
                "URIs) or hf_dataset: a saved dataset folder")
        files = s.get("files")
        if files and not (isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str)
                                                                                      for f in files))):
            bad(f"{key}.files", "must be a path or a list of paths", files, "e.g. files: [data/a.jsonl]")
        weight = s.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            bad(f"{key}.weight", "must be a number above 0", weight, "e.g. weight: 0.3 (weights need not sum to 1)")
        fraction = s.get("eval_fraction", 0.0)
        if not isinstance(fraction, (int, float)) or not 0 <= fraction < 0.5:
            bad(f"{key}.eval_fraction", "must be at least 0 and below 0.5", fraction, "use e.g. 0.05")
        elif fraction and data.eval_files:
            bad(f"{key}.eval_fraction", "set together with data.eval_files", fraction,
                "use one source of eval data: remove data.eval_files or the sources' eval_fraction")
        if "columns" in s and not isinstance(s["columns"], dict):
            bad(f"{key}.columns", "must be a mapping", s["columns"], "e.g. columns: {messages: conversation}")
        if not isinstance(s.get("json_field", ""), str):
            bad(f"{key}.json_field", "must be a string", s["json_field"], "e.g. json_field: data")
        if s.get("system_message") is not None and not isinstance(s["system_message"], str):
            bad(f"{key}.system_message", "must be a string", s["system_message"], "e.g. system_message: Be brief.")


def repeat_ratios(records: list[int], weights: list[float], kept: list[float]) -> list[float]:
    """Uses per record of each source, so that its share of the training examples is its weight's share.
    `records`: records per source; `kept`: the share of them that trains (1 - eval_fraction).

    >>> repeat_ratios([7000, 3000], [1, 1], [1, 1])
    [0.7142857142857143, 1.6666666666666667]
    >>> repeat_ratios([500], [3], [1])  # one source: every record once, whatever the weight
    [1.0]
    """
    if len(records) == 1:
        return [1.0]
    train = [n * k for n, k in zip(records, kept)]
    total, wsum = sum(train), sum(weights)
    return [total * w / wsum / t if t else 0.0 for t, w in zip(train, weights)]


def _unit(*parts) -> float:
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@functools.lru_cache(maxsize=64)
def _block_order(seed: int, name: str, block: int) -> np.ndarray:
    key = int.from_bytes(hashlib.blake2b(f"{seed}\0{name}\0{block}".encode(), digest_size=8).digest(), "big")
    return np.random.default_rng(key).permutation(BLOCK)


def copies(ratio: float, seed: int, name: str, line: int) -> int:
    """How many times the record at `line` (1-based) of the file named `name` is used, for a source's `ratio`.

    >>> copies(1.0, 42, "a.jsonl", 7), copies(2.0, 42, "a.jsonl", 7)
    (1, 2)
    >>> abs(sum(copies(0.25, 42, "a.jsonl", n) for n in range(1, 10_001)) - 2500) <= 5  # a quarter, near exactly
    True
    >>> abs(sum(copies(1.5, 7, "b.jsonl", n) for n in range(1, 1_001)) - 1500) <= 5
    True
    """
    whole = math.floor(ratio)
    fraction = ratio - whole
    if fraction < 1e-12:
        return whole
    p = line - 1
    q = (p // BLOCK) * BLOCK + int(_block_order(seed, name, p // BLOCK)[p % BLOCK])
    point = (_unit(seed, name) + q * GOLDEN) % 1.0
    return whole + (point < fraction)
