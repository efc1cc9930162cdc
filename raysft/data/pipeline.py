"""The Ray Data side of `raysft prepare`; the only importer of ray.data.

    chunks of input ─► [records → ChatML → tokens + labels] ─► [packed rows] ─► Parquet     (Ray Data, streaming)

`run_split` maps `process_chunks` over one split's chunks, one chunk per task, in input order, and streams
the rows to Parquet in the work folder. Each task also writes, beside the rows, its counts (`stats/`), its
rejected records (`rejects/`, with on_bad_record=skip) and the eval rows it held out (`eval/`).

Errors take one route. A user's mistake met inside a task (a bad record under on_bad_record=error, an
unreadable file: any `UserError`) is written to `errors/` and the task goes on without that chunk; once an
error exists the remaining chunks are skipped; `run_split` returns the first one, in input order, for the
driver to raise as itself. (Failing the task instead makes Ray Data log pages of traceback for one line of
the user's data.) Any other exception takes the same route as one line naming the chunk's file and lines and a
log file (`Task.log_dir`) that holds its traceback.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysft.data.chunks import Settings, chunk_to_examples, rows_table, train_tables
from raysft.data.messages import TRAIN_FLAGS
from raysft.data.prepared import EVAL, ROW_SCHEMA, TRAIN, saved_tokenizer, split_dir
from raysft.data.reading import describe_chunk
from raysft.data.records import RecordError
from raysft.data.sources import Chunk
from raysft.errors import UserError
from raysft.storage import write_atomic

STATS, REJECTS, ERRORS = "stats", "rejects", "errors"  # the tasks' side files in the work folder
ERROR_CHARS = 200  # of an unexpected exception's message in the one-line error


@dataclass(frozen=True)
class Task:
    """What every chunk task of one split is given."""

    settings: Settings
    work_dir: str  # the prepared folder being made; its tokenizer/ is the one to use
    split: str
    log_dir: str = ""  # where an unexpected error's traceback goes (default: {work_dir}/../logs)
    sources: tuple = ()  # data.sources' own Settings, by Chunk.origin (empty: `settings` for every chunk)
    tokenizer_class: str = ""  # the driver's tokenizer class (prepared.tokenizer_class): loads without torch
    max_tasks: int = 0  # chunk tasks at once; 0 = as many as Ray Data's free CPUs allow

    def settings_of(self, chunk: Chunk) -> Settings:
        return self.sources[chunk.origin] if self.sources else self.settings


# ------------------------------------------------------------------ the task side (runs in Ray workers)

# once per Ray worker process and prepared folder, reused across its tasks
_tokenizer = functools.lru_cache(maxsize=4)(saved_tokenizer)


def _node() -> str:
    """The Ray node this task runs on (its id, shortened), for the manifest's `prepare_nodes`."""
    import ray

    return (ray.get_runtime_context().get_node_id() or "")[:12] if ray.is_initialized() else ""


def _error_json(exc: UserError) -> str:
    if isinstance(exc, RecordError):
        return json.dumps({"record": [exc.reason, exc.message, exc.where]})
    return json.dumps({"args": list(exc.args)})


def _error_from_json(text: str) -> UserError:
    info = json.loads(text)
    return RecordError(*info["record"]) if "record" in info else UserError(*info["args"])


def unexpected(exc: Exception, chunk: Chunk, task: Task, name: str) -> UserError:
    """An exception that is not a `UserError`, as one line naming the chunk and the file with its traceback."""
    import traceback

    log_dir = task.log_dir or os.path.join(os.path.dirname(os.path.dirname(task.work_dir)), "logs")
    log = os.path.join(log_dir, f"prepare-{name}.log")
    os.makedirs(log_dir, exist_ok=True)
    write_atomic(log, f"{describe_chunk(chunk)}\n\n" + "".join(traceback.format_exception(exc)))
    return UserError(f"{describe_chunk(chunk)}: preparing these records failed ({type(exc).__name__}: "
                     f"{str(exc)[:ERROR_CHARS]}). fix: check these lines; if they look right, report it with the "
                     f"traceback in {log}")


def process_chunks(batch: dict, task: Task) -> pa.Table:
    """Ray Data UDF: chunk rows -> training rows, with the side files described above."""
    work = task.work_dir
    tables = []
    for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
        chunk = Chunk(**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
        s = task.settings_of(chunk)
        if os.listdir(os.path.join(work, ERRORS)):
            continue
        name = f"{task.split}-{chunk.index:06d}"
        try:
            result = chunk_to_examples(chunk, s, _tokenizer(work, task.tokenizer_class))
        except UserError as exc:
            write_atomic(os.path.join(work, ERRORS, f"{name}.json"), _error_json(exc))
            continue
        except Exception as exc:  # not the data's fault as far as raysft knows: one line, the traceback in a file
            write_atomic(os.path.join(work, ERRORS, f"{name}.json"), _error_json(unexpected(exc, chunk, task, name)))
            continue
        if result.rejects:
            write_atomic(os.path.join(work, REJECTS, f"{name}.jsonl"),
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rejects))
        if any(result.held_out):  # data.eval_fraction: the held-out examples' rows go straight to the eval split
            held = [e for e, h in zip(result.examples, result.held_out) if h]
            os.makedirs(split_dir(work, EVAL), exist_ok=True)
            pq.write_table(rows_table(held, s.max_seq_len, s.packing, chunk.origin),
                           os.path.join(split_dir(work, EVAL), f"held-out-{chunk.index:06d}.parquet"))
            n = result.counts["records_held_out"]
            write_atomic(os.path.join(work, STATS, f"{EVAL}-held-out-{chunk.index:06d}.json"),
                         json.dumps({"records_read": n, "records_kept": n, "rejected_by_reason": {}}))
        chunk_tables = train_tables(result, s.max_seq_len, s.packing, chunk.origin)
        trained = sum(int(np.sum(t["num_trained"])) for t in chunk_tables)  # counted once, per row (rows_table)
        write_atomic(os.path.join(work, STATS, f"{name}.json"), json.dumps(
            {**result.counts, "source": chunk.origin, "rows": sum(len(t) for t in chunk_tables),
             "trained_tokens": trained, "node": _node()}))
        tables += chunk_tables
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


# ------------------------------------------------------------------ the driver side


def make_work_dir(work: str) -> None:
    for sub in (STATS, REJECTS, ERRORS):
        os.makedirs(os.path.join(work, sub))


def first_error(work: str) -> Optional[UserError]:
    """The user error a task recorded, the first in input order (train before eval)."""
    found = sorted(glob.glob(os.path.join(work, ERRORS, "*.json")), key=lambda p: (
        not os.path.basename(p).startswith(TRAIN), os.path.basename(p)))
    if not found:
        return None
    with open(found[0], encoding="utf-8") as f:
        return _error_from_json(f.read())


def run_split(task: Task, chunks: list[Chunk]) -> Optional[UserError]:
    """Rows of one split's chunks into `{work_dir}/{split}/`; the first user error met, if any."""
    import ray.data

    from raysft.console import ChunkProgress, quiet_ray, verbose

    quiet_ray()  # after Ray Data set up its logging
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input, same row order: the schedule relies on it
    ctx.enable_progress_bars = verbose()  # raysft's own bar in a terminal instead (console.ChunkProgress)
    ctx.print_on_execution_start = verbose()
    _warm_workers(task, len(chunks))
    ds = ray.data.from_items([c.as_row() for c in chunks], override_num_blocks=len(chunks))
    ds = ds.map_batches(process_chunks, batch_size=1, batch_format="numpy", fn_kwargs={"task": task},
                        compute=ray.data.TaskPoolStrategy(size=task.max_tasks or None))
    done = functools.partial(_chunks_done, task)
    with ChunkProgress(done, len(chunks), f"prepare {task.split}"):
        ds.write_parquet(split_dir(task.work_dir, task.split), min_rows_per_file=1)
    return first_error(task.work_dir)


def _warm(work: str, tokenizer_class: str) -> None:
    """A chunk task's first-use costs, paid early: raysft's data modules imported and the tokenizer loaded (cached
    per worker process, `_tokenizer`)."""
    _tokenizer(work, tokenizer_class)


def _warm_workers(task: Task, chunks: int) -> None:
    """One `_warm` task per CPU (at most one per chunk), submitted before Ray Data starts, so that its start-up (its
    internal actors, the first task's lease, about a second on 2 cores) and the workers' first imports overlap
    instead of adding up (issue 40). Not waited for: the chunk tasks queue behind them on the same workers."""
    import ray

    n = min(int(ray.available_resources().get("CPU", 0)), task.max_tasks or chunks, chunks)
    warm = ray.remote(num_cpus=1, max_retries=0)(_warm)
    for _ in range(max(n, 0)):
        warm.remote(task.work_dir, task.tokenizer_class)


def _chunks_done(task: Task) -> int:
    """Chunks of `task`'s split finished so far (each leaves a stats or an errors file)."""
    return sum(1 for sub in (STATS, ERRORS) for name in os.listdir(os.path.join(task.work_dir, sub))
               if name.startswith(f"{task.split}-"))


def read_stats(work: str) -> list[tuple[str, dict]]:
    """Every task's counts file (`stats/`), read once: (file name, counts), for the three summaries below."""
    out = []
    for path in sorted(glob.glob(os.path.join(work, STATS, "*.json"))):
        with open(path, encoding="utf-8") as f:
            out.append((os.path.basename(path), json.load(f)))
    return out


def side_counts(stats: list[tuple[str, dict]], split: str) -> dict:
    """The tasks' counts of one split, added up."""
    from collections import Counter

    counts: Counter = Counter()
    by_reason: Counter = Counter()
    for name, c in stats:
        if name.startswith(f"{split}-"):
            by_reason.update(c["rejected_by_reason"])
            counts.update({k: v for k, v in c.items() if isinstance(v, int) and k != "source"})
    keys = ("records_read", "records_kept", "records_rejected", "records_held_out", "records_filtered",
            "examples_truncated", "examples_dropped", "prompt_over_max_seq_len")
    out = {**{k: counts[k] for k in keys}, "rejected_by_reason": dict(sorted(by_reason.items()))}
    longest = max((c.get("longest_prompt") or [0, ""] for name, c in stats if name.startswith(f"{split}-")),
                  key=lambda x: x[0], default=[0, ""])
    off = {flag: counts[f"turns_off_{flag}"] for flag in TRAIN_FLAGS if counts[f"turns_off_{flag}"]}
    out["turns_switched_off"] = off  # assistant turns the records' training flags left untrained, by flag
    out["turns_history_untrained"] = counts["turns_history_untrained"]  # the template's history rule's (apart)
    if counts["prompt_over_max_seq_len"]:  # the examples dropped because their prompt alone fills max_seq_len
        out["longest_prompt"] = {"tokens": longest[0], "where": longest[1]}
    return out


def _chunk_file(name: str, split: str = "") -> bool:
    """A chunk's own counts file (`{split}-{index}.json`), not the held-out counts written beside it."""
    head, _, rest = name.partition("-")
    return (not split or head == split) and rest[:1].isdigit()


def node_counts(stats: list[tuple[str, dict]]) -> dict:
    """{Ray node: chunks it prepared}, over both splits: where the tasks ran."""
    from collections import Counter

    nodes = Counter(c["node"] for name, c in stats if _chunk_file(name) and c.get("node"))
    return dict(sorted(nodes.items()))


def source_counts(stats: list[tuple[str, dict]], split: str, n_sources: int) -> list[dict]:
    """The tasks' counts of one split per source (data.sources): records, examples, trained tokens, rows."""
    keys = ("records_read", "records_kept", "records_rejected", "records_held_out", "records_filtered", "examples",
            "trained_tokens", "rows")
    out = [dict.fromkeys(keys, 0) for _ in range(n_sources)]
    for name, c in stats:
        if _chunk_file(name, split):
            for k in keys:
                out[c.get("source", 0)][k] += c.get(k, 0)
    return out


def merge_rejects(work: str, out_name: str) -> bool:
    """The tasks' rejects, in input order, into one file; whether there were any."""
    import shutil

    parts = sorted(glob.glob(os.path.join(work, REJECTS, "*.jsonl")))
    if parts:
        with open(os.path.join(work, out_name), "w", encoding="utf-8") as out:
            for p in parts:
                with open(p, encoding="utf-8") as f:
                    shutil.copyfileobj(f, out)
    return bool(parts)


def remove_side_files(work: str) -> None:
    import shutil

    for sub in (STATS, REJECTS, ERRORS):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
