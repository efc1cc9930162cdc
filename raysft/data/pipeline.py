"""`raysft prepare`: the Ray Data pipeline from input files to the prepared dataset; the only importer of ray.data.

    chunks of input ─► [records → ChatML → tokens + labels] ─► [packed rows] ─► Parquet     (Ray Data, streaming)

The driver plans chunks (hashing the inputs on the way), computes the fingerprint, and reuses
``{output_dir}/prepared/{fingerprint[:16]}`` when it is complete. Otherwise Ray Data runs the pure
functions of `records`, `chatml`, `tokenize` and `packing` over the chunks in parallel and streams the
rows to Parquet in a temporary folder; each chunk task also writes its counts (and, with
``on_bad_record: skip``, its rejected lines). The manifest is written last and the folder renamed into
place, so a prepared dataset with a manifest is always whole.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysft.config import Config
from raysft.data.chatml import render_example
from raysft.data.packing import fit_length, make_rows
from raysft.data.records import RecordError, split_record
from raysft.data.sources import Chunk, expand, plan, plan_hf, read_chunk
from raysft.data.tokenize import count_trained, load_tokenizer, tokenize_rendered
from raysft.errors import UserError

PREPARED_FORMAT = 1  # bump when the rows' meaning changes: it is part of the fingerprint
TOKENIZE_BATCH = 512
MAX_CHUNK_BYTES = 4 << 20  # fixed beyond small inputs: per-task memory must not grow with the input
MIN_CHUNK_BYTES = 256 << 10
LIST_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")
ROW_SCHEMA = pa.schema([(c, pa.list_(pa.int32())) for c in LIST_COLUMNS]
                       + [("num_tokens", pa.int32()), ("num_trained", pa.int32())])


# ------------------------------------------------------------------ the task side (runs in Ray workers)

_tokenizers: dict = {}


def _tokenizer(path: str):
    if path not in _tokenizers:  # once per Ray worker process, reused across its tasks
        from transformers import AutoTokenizer

        _tokenizers[path] = AutoTokenizer.from_pretrained(path)
    return _tokenizers[path]


def _list_column(values: list[list[int]]) -> pa.Array:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def held_out(where: str, fraction: float) -> bool:
    """data.eval_fraction: whether the record at `where` (file:line) is held out for eval. A hash of the file's
    name and the line, so the split is the same on every run, whatever the chunking, and no record is in both."""
    if not fraction:
        return False
    digest = hashlib.blake2b(os.path.basename(where).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def chunk_to_examples(chunk: Chunk, s: dict) -> tuple[list[tuple[list, list]], dict, list[dict], list[bool]]:
    """One chunk -> (examples fit to max_seq_len, counts, rejects, held out for eval per example).
    Raises RecordError under policy 'error'."""
    counts: Counter = Counter()
    by_reason: Counter = Counter()
    rejects: list[dict] = []

    def bad(err: RecordError, line: int, raw: str) -> None:
        if s["on_bad_record"] == "error":
            raise err
        by_reason[err.reason] += 1
        rejects.append({"where": err.where, "line": line, "reason": err.reason, "error": err.message, "raw": raw})

    pending = []  # (where, line, raw, rendered)
    for where, line, raw, record in read_chunk(chunk, s["hf_split"]):
        counts["records_read"] += 1
        try:
            if isinstance(record, RecordError):
                raise record
            pending.append((where, line, raw, render_example(split_record(record), s["system_message"])))
        except RecordError as exc:
            bad(exc if exc.where else exc.at(where), line, raw)
    tokenizer = _tokenizer(s["tokenizer_dir"])
    examples, held = [], []
    for i in range(0, len(pending), TOKENIZE_BATCH):
        batch = pending[i: i + TOKENIZE_BATCH]
        for (where, line, raw, _), (ids, labels) in zip(batch, tokenize_rendered([b[3] for b in batch], tokenizer,
                                                                                  s["loss_on"])):
            fitted = fit_length(ids, labels, s["max_seq_len"], s["on_overlong"])
            if fitted is None:
                counts["examples_dropped"] += 1
                continue
            if len(fitted[0]) < len(ids):
                counts["examples_truncated"] += 1
            if count_trained(fitted[1]) == 0:
                bad(RecordError("no_trained_tokens", "no token to train on" + (
                    f" within max_seq_len={s['max_seq_len']}" if len(fitted[0]) < len(ids) else "")
                    + "; fix: give the record an assistant answer, or raise data.max_seq_len", where), line, raw)
                continue
            examples.append(fitted)
            held.append(held_out(where, s.get("eval_fraction", 0.0)))
            counts["records_kept" if not held[-1] else "records_held_out"] += 1
    counts["records_rejected"] = sum(by_reason.values())
    rejects.sort(key=lambda r: r["line"])  # file order (token-level rejects are found after parse errors)
    return examples, {**counts, "rejected_by_reason": dict(by_reason)}, rejects, held


def _rows_table(examples: list, s: dict) -> pa.Table:
    rows = make_rows(examples, s["max_seq_len"], s["packing"])
    columns = [_list_column(getattr(rows, c)) for c in LIST_COLUMNS]
    columns.append(pa.array([sum(n) for n in rows.seq_lengths], pa.int32()))
    columns.append(pa.array([count_trained(lab) for lab in rows.labels], pa.int32()))
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def _process_chunks(batch: dict, s: dict) -> pa.Table:
    """Ray Data UDF: chunk rows -> training rows (packed or one example per row), plus counts on disk.

    A user's mistake (a bad record under on_bad_record=error, an unreadable file) is written to `errors/` for the
    driver to raise as itself, instead of failing the task: a failed task makes Ray Data log pages of traceback
    for what is one line of the user's data. Once an error exists, the remaining chunks are skipped.
    """
    tables = []
    errors = os.path.join(s["work_dir"], "errors")
    for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
        chunk = Chunk(**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
        if os.listdir(errors):
            continue
        try:
            examples, counts, rejects, held = chunk_to_examples(chunk, s)
        except UserError as exc:
            info = {"args": list(exc.args)}
            if isinstance(exc, RecordError):
                info = {"record": [exc.reason, exc.message, exc.where]}
            _write_atomic(os.path.join(errors, f"{s['split']}-{chunk.index:06d}.json"), json.dumps(info))
            continue
        name = f"{s['split']}-{chunk.index:06d}"
        if rejects:
            _write_atomic(os.path.join(s["work_dir"], "rejects", f"{name}.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
        if any(held):  # data.eval_fraction: the held-out examples' rows go straight to the eval split
            eval_table = _rows_table([e for e, h in zip(examples, held) if h], s)
            os.makedirs(os.path.join(s["work_dir"], "eval"), exist_ok=True)
            pq.write_table(eval_table, os.path.join(s["work_dir"], "eval", f"held-out-{chunk.index:06d}.parquet"))
            _write_atomic(os.path.join(s["work_dir"], "stats", f"eval-held-out-{chunk.index:06d}.json"), json.dumps(
                {"records_read": counts["records_held_out"], "records_kept": counts["records_held_out"],
                 "rejected_by_reason": {}}))
            examples = [e for e, h in zip(examples, held) if not h]
        _write_atomic(os.path.join(s["work_dir"], "stats", f"{name}.json"), json.dumps(counts))
        tables.append(_rows_table(examples, s))
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


# ------------------------------------------------------------------ the driver side


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _hash_dir(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def data_settings(cfg: Config) -> dict:
    d = cfg.data
    return {"max_seq_len": d.max_seq_len, "packing": d.packing, "loss_on": d.loss_on,
            "system_message": d.system_message, "on_bad_record": d.on_bad_record, "on_overlong": d.on_overlong,
            "hf_split": d.hf_split, "eval_fraction": d.eval_fraction}


def _chunk_bytes(total: int, cpus: int) -> int:
    """Enough chunks to keep every CPU busy, none so big that memory grows with the input."""
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, total // max(1, 4 * cpus))))


def read_manifest(prepared_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(prepared_dir, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _run_split(split: str, chunks: list[Chunk], settings: dict, out_dir: str) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input, same row order: the schedule relies on it
    ctx.raise_original_map_exception = True  # a RecordError reaches the driver as itself, not as text
    ds = ray.data.from_items([c.as_row() for c in chunks], override_num_blocks=len(chunks))
    ds = ds.map_batches(_process_chunks, batch_size=1, batch_format="numpy",
                        fn_kwargs={"s": {**settings, "split": split}})
    ds.write_parquet(out_dir, min_rows_per_file=1)


def _first_task_error(work: str) -> Optional[UserError]:
    """The user error a chunk task recorded (see `_process_chunks`), the first in input order."""
    found = sorted(glob.glob(os.path.join(work, "errors", "*.json")), key=lambda p: (
        not os.path.basename(p).startswith("train"), os.path.basename(p)))
    if not found:
        return None
    with open(found[0], encoding="utf-8") as f:
        info = json.load(f)
    return RecordError(*info["record"]) if "record" in info else UserError(*info["args"])


def _unwrap_user_error(exc: BaseException) -> Optional[UserError]:
    """A clean copy of the innermost UserError (e.g. a RecordError) behind Ray's task-error wrappers."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RecordError) and getattr(exc, "reason", None):
            found = RecordError(exc.reason, exc.message, exc.where)
        elif isinstance(exc, UserError) and type(exc).__name__ == "UserError":
            found = UserError(*exc.args)
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return found


def _summarise(work: str, split: str, max_seq_len: int) -> dict:
    counts: Counter = Counter()
    by_reason: Counter = Counter()
    for path in glob.glob(os.path.join(work, "stats", f"{split}-*.json")):
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        by_reason.update(c.pop("rejected_by_reason"))
        counts.update(c)
    files = sorted(glob.glob(os.path.join(work, split, "*.parquet")))
    table = pa.concat_tables([pq.read_table(f, columns=["num_tokens", "num_trained", "seq_lengths"]) for f in files]) \
        if files else ROW_SCHEMA.empty_table()
    lengths = np.asarray(table["seq_lengths"].combine_chunks().flatten(), dtype=np.int64) if len(table) else np.zeros(0)
    rows, tokens = len(table), int(np.sum(table["num_tokens"])) if len(table) else 0
    return {
        "records_read": counts["records_read"], "records_kept": counts["records_kept"],
        "records_rejected": counts["records_rejected"], "records_held_out": counts["records_held_out"],
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "examples_truncated": counts["examples_truncated"], "examples_dropped": counts["examples_dropped"],
        "rows": rows, "tokens": tokens, "trained_tokens": int(np.sum(table["num_trained"])) if rows else 0,
        "padding_fraction": round(1 - tokens / (rows * max_seq_len), 6) if rows else 0.0,
        "example_tokens": {"mean": round(float(lengths.mean()), 2) if len(lengths) else 0,
                           "p50": int(np.percentile(lengths, 50)) if len(lengths) else 0,
                           "p95": int(np.percentile(lengths, 95)) if len(lengths) else 0,
                           "max": int(lengths.max()) if len(lengths) else 0},
        "files": [{"path": os.path.relpath(f, work), "rows": pq.ParquetFile(f).metadata.num_rows} for f in files],
    }


def _merge_rejects(work: str) -> int:
    parts = sorted(glob.glob(os.path.join(work, "rejects", "*.jsonl")))
    if parts:
        with open(os.path.join(work, "rejects.jsonl"), "w", encoding="utf-8") as out:
            for p in parts:
                with open(p, encoding="utf-8") as f:
                    shutil.copyfileobj(f, out)
    shutil.rmtree(os.path.join(work, "rejects"), ignore_errors=True)
    return len(parts)


def prepared_dir(cfg: Config, fingerprint: str) -> str:
    return os.path.join(cfg.output_dir, "prepared", fingerprint[:16])


def plan_inputs(cfg: Config, cpus: int):
    """Expand, hash and chunk every input; returns (train chunks, eval chunks, inputs for the fingerprint)."""
    d = cfg.data
    train_files = expand(d.train_files, "data.train_files") if d.train_files else []
    eval_files = expand(d.eval_files, "data.eval_files") if d.eval_files else []
    total = sum(os.path.getsize(p) for p in train_files + eval_files if "://" not in p)
    size = _chunk_bytes(total, cpus)
    train_chunks, train_inputs = plan(train_files, size)
    if d.hf_dataset:
        hf_chunks, hf_inputs = plan_hf(d.hf_dataset, d.hf_split)
        train_chunks = [Chunk(**{**c.as_row(), "index": i})
                        for i, c in enumerate(train_chunks + hf_chunks)]
        train_inputs += hf_inputs
    eval_chunks, eval_inputs = plan(eval_files, size)
    return train_chunks, eval_chunks, {"train": train_inputs, "eval": eval_inputs}


def prepare(cfg: Config, log: Callable[[str], None] = print, start_ray: Optional[Callable[[], None]] = None,
            cpus: int = 0) -> tuple[str, dict]:
    """Prepare (or reuse) the dataset for `cfg`; returns (prepared folder, manifest)."""
    t0 = time.time()
    tokenizer = load_tokenizer(cfg.tokenizer.name_or_path or cfg.model.name_or_path, cfg.model.trust_remote_code,
                               "tokenizer.name_or_path" if cfg.tokenizer.name_or_path else "model.name_or_path")
    train_chunks, eval_chunks, inputs = plan_inputs(cfg, cpus or os.cpu_count() or 1)
    staging = tempfile.mkdtemp(prefix="raysft-tok-")
    try:
        tokenizer.save_pretrained(staging)
        tok_hash = _hash_dir(staging)
        fingerprint = _fingerprint({"format": PREPARED_FORMAT, "inputs": inputs, "settings": data_settings(cfg),
                                    "tokenizer": tok_hash})
        final = prepared_dir(cfg, fingerprint)
        manifest = read_manifest(final)
        if manifest and manifest.get("fingerprint") == fingerprint:
            log(f"prepare: reusing {final} (fingerprint {fingerprint[:16]}, same inputs, settings and tokenizer)")
            return final, manifest
        if start_ray:
            start_ray()
        os.makedirs(os.path.dirname(final), exist_ok=True)
        work = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        for sub in ("stats", "rejects", "errors"):
            os.makedirs(os.path.join(work, sub))
        shutil.copytree(staging, os.path.join(work, "tokenizer"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    settings = {**data_settings(cfg), "tokenizer_dir": os.path.join(work, "tokenizer"), "work_dir": work}
    size = f"{sum(i.get('bytes', 0) for i in inputs['train'] + inputs['eval']) / 1e6:.1f} MB"
    log(f"prepare: {len(train_chunks)} train chunks + {len(eval_chunks)} eval chunks ({size}) -> {final}")
    try:
        for split, chunks in (("train", train_chunks), ("eval", eval_chunks)):
            if chunks:
                _run_split(split, chunks, settings, os.path.join(work, split))
            user = _first_task_error(work)
            if user is not None:
                shutil.rmtree(work, ignore_errors=True)
                raise user
    except UserError:
        raise
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)
        user = _unwrap_user_error(exc)
        if user is not None:
            raise user from None
        raise
    train = _summarise(work, "train", cfg.data.max_seq_len)
    manifest = {"fingerprint": fingerprint, "format": PREPARED_FORMAT, **train,
                "eval": (_summarise(work, "eval", cfg.data.max_seq_len)
                         if eval_chunks or cfg.data.eval_fraction else None),
                "settings": data_settings(cfg), "inputs": inputs, "tokenizer": {"dir": "tokenizer", "sha256": tok_hash,
                                                                                "vocab_size": len(tokenizer)},
                "rejects_file": "rejects.jsonl" if _merge_rejects(work) else None,
                "seconds": round(time.time() - t0, 2)}
    for sub in ("stats", "errors"):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    if train["rows"] == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise UserError(f"data.train_files: no training rows from {train['records_read']} records "
                        f"(rejected: {train['rejected_by_reason'] or 'none'}). fix: check the data's format")
    _write_atomic(os.path.join(work, "manifest.json"), json.dumps(manifest, indent=2, ensure_ascii=False))
    if os.path.exists(final):  # an incomplete earlier attempt (no valid manifest): replace it
        shutil.rmtree(final)
    os.rename(work, final)
    return final, manifest


def summary(manifest: dict) -> str:
    m = manifest
    lines = [f"records: {m['records_read']} read, {m['records_kept']} kept, {m['records_rejected']} rejected"
             + (f", {m['records_held_out']} held out for eval" if m.get("records_held_out") else "")
             + (f" {m['rejected_by_reason']}" if m["rejected_by_reason"] else ""),
             f"examples: {m['examples_truncated']} truncated, {m['examples_dropped']} dropped (longer than max_seq_len)",
             f"rows: {m['rows']}, tokens: {m['tokens']}, trained tokens: {m['trained_tokens']}, "
             f"padding: {m['padding_fraction']:.2%}",
             f"example tokens: {m['example_tokens']}"]
    if m.get("eval"):
        lines.append(f"eval: {m['eval']['records_kept']} records, {m['eval']['rows']} rows, {m['eval']['tokens']} tokens")
    if m.get("rejects_file"):
        lines.append(f"rejected lines written to {m['rejects_file']}")
    return "\n".join(lines)
