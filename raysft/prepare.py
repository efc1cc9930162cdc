"""`raysft prepare` (and the first stage of `raysft train`): input files -> the prepared dataset, on the driver.

The driver plans chunks (hashing the inputs on the way), computes the fingerprint, and reuses the prepared
folder of that fingerprint when it is complete (`data/prepared.py` owns the layout). Otherwise it starts Ray
(only now: a reused dataset needs none), runs the Ray Data pipeline (`data/pipeline.py`) over each split in a
work folder, writes the manifest last, and renames the folder into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Callable, Optional

from raysft import storage
from raysft.cluster import local_cores
from raysft.config import Config
from raysft.data import pipeline, prepared
from raysft.data.chunks import Settings
from raysft.data.mixing import repeat_ratios, sources_of
from raysft.data.preflight import preflight
from raysft.data.sources import Chunk, expand, plan, plan_hf
from raysft.data.template import RULES
from raysft.data.tokenize import auto_template, load_tokenizer, raw_tokenizer, ready_tokenizer
from raysft.errors import UserError, format_error

MAX_CHUNK_BYTES = 4 << 20  # fixed beyond small inputs: per-task memory must not grow with the input
MIN_CHUNK_BYTES = 256 << 10
TARGET_CHUNKS = 16  # enough tasks to keep a few nodes' CPUs busy; more small ones cost more than they spread


def chunk_bytes(total: int) -> int:
    """Enough chunks to keep a cluster's CPUs busy, none so big that memory grows with the input. It depends on the
    input's size alone, never on the machine or the cluster: the rows (packed per chunk) are the same everywhere.

    >>> chunk_bytes(1 << 30) == MAX_CHUNK_BYTES, chunk_bytes(1000) == MIN_CHUNK_BYTES, chunk_bytes(32 << 20) >> 20
    (True, True, 2)
    """
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, total // TARGET_CHUNKS)))


def plan_inputs(cfg: Config) -> tuple[list[Chunk], list[Chunk], dict, list[dict]]:
    """Expand, hash and chunk every input; returns (train chunks, eval chunks, inputs for the fingerprint, the
    training sources of `mixing.sources_of`, each with its `records`)."""
    d = cfg.data
    sources = sources_of(d)
    keyed = [(f"data.sources[{i}].files" if d.sources else "data.train_files", s) for i, s in enumerate(sources)]
    files = [expand(s["files"], key) if s["files"] else [] for key, s in keyed]
    eval_files = expand(d.eval_files, "data.eval_files") if d.eval_files else []
    total = sum(os.path.getsize(p) for p in sum(files, []) + eval_files if not storage.is_uri(p))
    size = chunk_bytes(total)
    train_chunks: list[Chunk] = []
    train_inputs: list[dict] = []
    for i, ((key, source), source_files) in enumerate(zip(keyed, files)):
        chunks, inputs = plan(source_files, size, len(sources) > 1, source["json_field"], key)
        if source["hf_dataset"]:
            hf_chunks, hf_inputs = plan_hf(source["hf_dataset"], source["hf_split"])
            chunks, inputs = chunks + hf_chunks, inputs + hf_inputs
        source["records"] = sum(x.get("records", 0) for x in inputs)
        train_chunks += [dataclasses.replace(c, origin=i) for c in chunks]
        train_inputs += [{**x, "source": source["name"]} if d.sources else x for x in inputs]
    train_chunks = [dataclasses.replace(c, index=i) for i, c in enumerate(train_chunks)]
    eval_chunks, eval_inputs = plan(eval_files, size, json_field=d.json_field, key="data.eval_files")
    return train_chunks, eval_chunks, {"train": train_inputs, "eval": eval_inputs}, sources


def source_settings(base: Settings, sources: list[dict], seed: int) -> tuple[Settings, ...]:
    """Each source's Settings, with the uses per record that give it its weight's share (data/mixing.py)."""
    kept = [1 - float(s.get("eval_fraction", base.eval_fraction) or 0) for s in sources]
    ratios = repeat_ratios([s["records"] for s in sources], [s["weight"] for s in sources], kept)
    return tuple(base.for_source(s, r, seed) for s, r in zip(sources, ratios))


def source_report(sources: list[dict], settings: tuple, counts: list[dict]) -> list[dict]:
    """The manifest's per-source lines: what was read, kept and rejected, and what the rows hold."""
    examples = sum(c["examples"] for c in counts) or 1
    weights = sum(s["weight"] for s in sources)
    return [{"name": s["name"], "weight": s["weight"], "target_share": round(s["weight"] / weights, 6),
             "uses_per_record": round(st.repeat, 6), **c, "share": round(c["examples"] / examples, 6)}
            for s, st, c in zip(sources, settings, counts)]


def combined(checks: list[dict]) -> dict:
    """The preflights of several sources as one."""
    out = dict(checks[0])
    for c in checks[1:]:
        for k in ("records", "later_turns", "history_as_inference"):
            out[k] += c[k]
        out["rules"] = sorted(set(out["rules"]) | set(c["rules"]))
    return out


def _counts(stats: list, work: str, split: str, max_seq_len: int) -> dict:
    return {**pipeline.side_counts(stats, split), **prepared.split_statistics(work, split, max_seq_len)}


def task_cap() -> int:
    """How many chunk tasks may run at once: the cores, when an in-process Ray has more logical CPUs than cores
    (`raysft train` gives it room for the Train workers: uncapped, more tasks than cores would share them); else 0,
    Ray Data's own limit. A cap equal to the logical CPUs is worse than none: the map tasks, no longer fused with
    the Parquet writes (an explicit concurrency stops Ray Data fusing them), hold every CPU the writes then wait
    for -- 10.3k against 19.8k records/s at 200k records on 2 cores (issue 40, docs/BENCHMARKS.md)."""
    import ray

    cores = local_cores()
    return cores if cores and ray.cluster_resources().get("CPU", 0) > cores else 0


def tokenizer_path(cfg: Config) -> str:
    return cfg.tokenizer.name_or_path or cfg.model.name_or_path


def tokenizer_where(cfg: Config) -> str:
    return "tokenizer.name_or_path" if cfg.tokenizer.name_or_path else "model.name_or_path"


def resolve_chat_template(cfg: Config):
    """`data.chat_template: auto` resolved, once, on the driver: `model` when the tokenizer has its own template,
    else `chatml`; `cfg` then holds the choice (so the manifest, the workers and the checkpoint's config do, and a run
    whose resolved template is unchanged resumes as before). Returns the tokenizer as loaded when it was `auto`,
    else None."""
    if cfg.data.chat_template != "auto":
        return None
    raw = raw_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code, tokenizer_where(cfg))
    cfg.data.chat_template = auto_template(raw)
    if cfg.data.chat_template == "chatml" and cfg.data.chat_template_kwargs:
        raise UserError(format_error("data.chat_template_kwargs", "are variables for the model's own template, and "
                                     "data.chat_template: auto chose chatml (the tokenizer has no chat template)",
                                     ", ".join(map(str, cfg.data.chat_template_kwargs)),
                                     "give the template (data.chat_template: PATH.jinja), or remove them"))
    return raw


def prepare(cfg: Config, log: Callable[[str], None] = print,
            start_ray: Optional[Callable[[], None]] = None) -> tuple[str, dict]:
    """Prepare (or reuse) the dataset for `cfg`; returns (prepared folder, manifest)."""
    t0 = time.time()
    raw = resolve_chat_template(cfg)
    auto = raw is not None
    tokenizer = ready_tokenizer(raw, cfg.data.chat_template, tokenizer_path(cfg)) if auto else load_tokenizer(
        tokenizer_path(cfg), cfg.model.trust_remote_code, tokenizer_where(cfg), cfg.data.chat_template)
    train_chunks, eval_chunks, inputs, sources = plan_inputs(cfg)
    phases = {"load_and_plan": time.time() - t0}  # seconds per phase, for the manifest (bench/prepare.py reads it)
    settings = Settings.from_config(cfg.data)
    per_source = source_settings(settings, sources, cfg.train.seed)
    staging = tempfile.mkdtemp(prefix="raysft-tok-")
    try:
        tokenizer.save_pretrained(staging)
        tok_hash = prepared.hash_dir(staging)
        fingerprint = prepared.fingerprint(inputs, {**settings.as_dict(), "sources": [
            {"name": src["name"], "weight": src["weight"], **st.as_dict()} for src, st in zip(sources, per_source)]},
            tok_hash)
        final = prepared.location(cfg.data.prepared_path, fingerprint)
        manifest = prepared.read_manifest(final)
        if manifest and manifest.get("fingerprint") == fingerprint:
            log(f"prepare: reusing {final} (fingerprint {prepared.short(fingerprint)}, same inputs, settings and "
                "tokenizer)")
            return final, manifest
        try:
            checked = combined([preflight([c for c in train_chunks if c.origin == i], st, tokenizer, columns_key=(
                f"data.sources[{i}].columns" if cfg.data.sources else "data.columns"))
                for i, st in enumerate(per_source)])
        except UserError as err:
            if not auto or settings.chat_template != "model":
                raise
            raise UserError(f"{err} (data.chat_template: auto chose the tokenizer's own chat template; to train in "
                            "raysft's ChatML instead, set data.chat_template: chatml)") from None
        kwargs = f" with {settings.chat_template_kwargs}" if settings.chat_template_kwargs else ""
        log(f"prepare: chat template {settings.chat_template}{kwargs} checked on {checked['records']} records (masks, "
            f"end of turn {checked['end_of_turn']} trained, prompts as apply_chat_template gives them"
            + (f"; history of later turns as at inference: {checked['history_as_inference']}/"
               f"{checked['later_turns']}" if checked["later_turns"] else "") + ")"
            + "".join(f"\nprepare: template rule {rule}: {RULES[rule]}" for rule in checked["rules"]))
        phases["fingerprint_and_preflight"] = time.time() - t0 - sum(phases.values())
        if start_ray:
            start_ray()
        phases["ray_start"] = time.time() - t0 - sum(phases.values())
        os.makedirs(os.path.dirname(final), exist_ok=True)
        work = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        pipeline.make_work_dir(work)
        shutil.copytree(staging, prepared.tokenizer_dir(work))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = f"{sum(i.get('bytes', 0) for i in inputs['train'] + inputs['eval']) / 1e6:.1f} MB"
    log(f"prepare: {len(train_chunks)} train chunks + {len(eval_chunks)} eval chunks ({size}) -> {final}")
    try:
        max_tasks = task_cap()
        for split, chunks in ((prepared.TRAIN, train_chunks), (prepared.EVAL, eval_chunks)):
            task = pipeline.Task(settings, work, split, log_dir=os.path.join(cfg.output_dir, "logs"),
                                 sources=per_source if split == prepared.TRAIN else (),
                                 tokenizer_class=prepared.tokenizer_class(tokenizer), max_tasks=max_tasks)
            error = pipeline.run_split(task, chunks) if chunks else None
            if error is not None:
                raise error
        phases["ray_data"] = time.time() - t0 - sum(phases.values())
        stats = pipeline.read_stats(work)
        train = _counts(stats, work, prepared.TRAIN, settings.max_seq_len)
        if train["rows"] == 0:
            raise UserError(f"data.train_files: no training rows from {train['records_read']} records "
                            f"(rejected: {train['rejected_by_reason'] or 'none'}). fix: check the data's format")
        held = any(st.eval_fraction for st in per_source)  # data.eval_fraction, or a source's own
        evals = _counts(stats, work, prepared.EVAL, settings.max_seq_len) if eval_chunks or held else None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        try:  # nothing is left of a failed prepare: not even an empty prepared/ folder
            os.rmdir(os.path.dirname(final))
        except OSError:
            pass  # other prepared datasets are in it
        raise
    report = source_report(sources, per_source, pipeline.source_counts(stats, prepared.TRAIN, len(sources)))
    manifest = {"fingerprint": fingerprint, "format": prepared.FORMAT, **train, "eval": evals, "sources": report,
                "settings": settings.as_dict(), "inputs": inputs, "chat_template": checked,
                "tokenizer": {"dir": prepared.TOKENIZER, "sha256": tok_hash, "vocab_size": len(tokenizer)},
                "rejects_file": prepared.REJECTS if pipeline.merge_rejects(work, prepared.REJECTS) else None,
                "prepare_nodes": pipeline.node_counts(stats), "prepare_max_tasks": max_tasks or None}
    phases["statistics_and_manifest"] = time.time() - t0 - sum(phases.values())
    manifest.update(seconds=round(time.time() - t0, 2), phases={k: round(v, 3) for k, v in phases.items()})
    pipeline.remove_side_files(work)
    storage.write_atomic(os.path.join(work, prepared.MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False))
    return _move_into_place(work, final, fingerprint, manifest)


def _move_into_place(work: str, final: str, fingerprint: str, manifest: dict) -> tuple[str, dict]:
    """The finished work folder renamed to `final`. Another run sharing data.prepared_path may have prepared the
    same fingerprint meanwhile: then its folder is used (the same rows) and this one dropped; a folder there without
    a valid manifest is an interrupted attempt, replaced."""
    for _ in range(2):
        theirs = prepared.read_manifest(final) if os.path.exists(final) else None
        if theirs and theirs.get("fingerprint") == fingerprint:
            shutil.rmtree(work, ignore_errors=True)
            return final, theirs
        if os.path.exists(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(work, final)
            return final, manifest
        except OSError:  # made by another run between the check and the rename: look again
            continue
    raise RuntimeError(f"{final}: cannot move the prepared dataset into place (another run keeps writing it)")
