"""One chunk of input -> training examples and rows: the work of one Ray Data task, as plain functions.

`chunk_to_examples` reads a chunk's records, renders, tokenizes and fits them (`records`, `chatml`,
`tokenize`, `packing`), counting what it keeps and rejecting bad records by policy; `rows_table` packs
examples into Arrow rows of the prepared schema. `Settings` are the data settings that shape the rows (and
so are part of the prepared data's fingerprint). This module imports neither ray nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from raysft.data.chatml import Rendered, Segment, render_example
from raysft.data.mixing import PER_SOURCE_SETTINGS, copies
from raysft.data.packing import fit_length, make_rows
from raysft.data.prepared import LIST_COLUMNS, ROW_SCHEMA
from raysft.data.reading import read_chunk
from raysft.data.records import Example, RecordError, rename, split_record
from raysft.data.sources import Chunk
from raysft.data.template import render_native
from raysft.data.tokenize import IGNORE_INDEX, count_trained, tokenize_rendered
from raysft.data.transcripts import transcripts
from raysft.data.where import label_error, matches

TOKENIZE_BATCH = 512  # examples per tokenizer call: large enough to amortise the call, small for memory
# the reasons a record is bad by itself (skipping it helps); the others say the template or the config is wrong
SKIP_HELPS = frozenset({"invalid_json", "invalid_utf8", "too_deep", "not_an_object", "duplicate_key", "unknown_format",
                        "missing_field", "bad_type", "bad_message", "unknown_role", "empty_conversation",
                        "no_assistant", "completion_not_assistant", "no_completion", "empty_answer", "bad_tool_call",
                        "bad_tools", "bad_template_kwargs", "damaged_file"})
SKIP_HINT = "; or skip such records with data.on_bad_record: skip (counted, and written to the rejects file)"


@dataclass(frozen=True)
class Settings:
    """The data settings that shape the rows (`data.*`)."""

    max_seq_len: int
    packing: bool
    loss_on: str
    system_message: Optional[str]
    on_bad_record: str
    on_overlong: str
    hf_split: str
    eval_fraction: float
    chat_template: str = "chatml"
    chat_template_kwargs: dict = field(default_factory=dict)  # extra render variables (model or file templates)
    train_on_reasoning: bool = True
    columns: dict = field(default_factory=dict)
    transcript_roles: dict = field(default_factory=dict)  # data.transcript_roles: speakers of string transcripts
    where: Optional[dict] = None  # data.where (data/where.py); None: unset, so labelled records are refused
    repeat: float = 1.0  # data.sources: uses per record (data/mixing.py); 1 = each record once
    mix_seed: int = 0  # train.seed, when the sources are mixed

    @classmethod
    def from_config(cls, data) -> "Settings":
        return cls(**{f.name: getattr(data, f.name) for f in dataclasses.fields(cls) if hasattr(data, f.name)})

    def for_source(self, source: dict, repeat: float, seed: int) -> "Settings":
        """This source's settings: its own columns, system_message, eval_fraction, hf_split over data.*."""
        own = {k: source[k] for k in PER_SOURCE_SETTINGS if source.get(k) is not None}
        return dataclasses.replace(self, **own, repeat=repeat, mix_seed=seed if repeat != 1.0 else 0)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ChunkResult:
    examples: list = field(default_factory=list)  # (input_ids, labels) fit to max_seq_len
    held_out: list = field(default_factory=list)  # per example: held out for eval (data.eval_fraction)
    copies: list = field(default_factory=list)  # per example: times it trains (data.sources' weights; 0 when held out)
    counts: dict = field(default_factory=dict)  # records_read, records_kept, ..., rejected_by_reason
    rejects: list = field(default_factory=list)  # {where, line, reason, error, raw} per rejected record
    longest_prompt: list = field(default_factory=lambda: [0, ""])  # of the examples dropped for it: [tokens, where]


def held_out(where: str, fraction: float) -> bool:
    """data.eval_fraction: whether the record at `where` (file:line) is held out for eval. A hash of the file's
    name and the line, so the split is the same on every run, whatever the chunking, and no record is in both.

    >>> held_out("data/a.jsonl:3", 0.0)
    False
    """
    if not fraction:
        return False
    digest = hashlib.blake2b(os.path.basename(where).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def example_of(record, settings: Settings) -> Example:
    """A parsed record, its columns renamed (`data.columns`) and transcripts read (`data.transcript_roles`), as
    prompt and completion; raises RecordError."""
    return split_record(_read(record, settings))


def _read(record, settings: Settings) -> dict:
    """The record with its columns renamed and its transcripts read."""
    renamed = rename(record, settings.columns)
    return transcripts(renamed, settings.transcript_roles) if settings.transcript_roles else renamed


def selected(record, settings: Settings) -> Optional[dict]:
    """The record as `_read` gives it, or None when data.where leaves it out; raises RecordError (a labelled
    record while data.where is unset, a comparison with a field that holds no number)."""
    renamed = _read(record, settings)
    err = label_error(renamed, settings.where)
    if err is not None:
        raise err
    return renamed if settings.where is None or matches(renamed, settings.where) else None


def render(record, settings: Settings, tokenizer, example: Optional[Example] = None) -> Rendered:
    """A parsed record (or its `example_of`, when the caller has it) -> its rendered segments under
    `data.chat_template`; raises RecordError.

    Plain text is ended with the tokenizer's EOS token, trained (unless it already ends with it)."""
    example = example or example_of(record, settings)
    if settings.chat_template == "chatml":
        if example.template_kwargs:
            raise RecordError("template_kwargs_unused", "chat_template_kwargs: variables for a model's own template, "
                                                        "and data.chat_template is chatml, which reads none; fix: use "
                                                        "data.chat_template: auto or model, or drop the field")
        rendered = render_example(example, settings.system_message, settings.train_on_reasoning)
    else:
        rendered = render_native(example, tokenizer, settings.system_message, settings.train_on_reasoning,
                                 settings.chat_template_kwargs)
    if rendered.chat:
        return rendered
    eos = tokenizer.eos_token
    if not eos:
        raise RecordError("no_eos", "plain text is ended with the tokenizer's EOS token so a model learns to stop, "
                                    "and this tokenizer has none; fix: give the tokenizer an eos_token, or the "
                                    "record as messages")
    last = rendered.segments[-1] if rendered.segments else None
    if last is not None and last.control and last.text == eos:
        return rendered
    return dataclasses.replace(rendered, segments=rendered.segments + (Segment(eos, control=True, trained=True),))


def mask_error(rendered: Rendered, labels: list, loss_on: str) -> Optional[RecordError]:
    """A conversation whose mask trains nothing, or everything (the mask is broken, not the data)."""
    if not rendered.chat or loss_on != "completion":
        return None
    trained = count_trained(labels)
    if trained == 0:
        return RecordError("no_trained_tokens", "no token to train on: the chat template gave the assistant turns "
                                                "no tokens; fix: check data.chat_template renders assistant messages")
    if trained == len(labels) - 1 and labels[0] == IGNORE_INDEX:
        return RecordError("all_trained", "every token is trained, the prompt too: the chat template's prompt "
                                          "rendered to nothing; fix: check data.chat_template renders user and system "
                                          "messages")
    return None


def chunk_to_examples(chunk: Chunk, settings: Settings, tokenizer) -> ChunkResult:
    """One chunk -> examples, counts and rejects. Raises RecordError under on_bad_record=error."""
    s = settings
    counts: Counter = Counter()
    by_reason: Counter = Counter()
    out = ChunkResult()

    def bad(err: RecordError, line: int, raw: str) -> None:
        if s.on_bad_record == "error":
            raise RecordError(err.reason, err.message + SKIP_HINT, err.where) if err.reason in SKIP_HELPS else err
        by_reason[err.reason] += 1
        out.rejects.append({"where": err.where, "line": line, "reason": err.reason, "error": err.message, "raw": raw})

    pending = []  # (where, line, raw, rendered)
    name = os.path.basename(chunk.source.rstrip("/"))  # the file's name keys which records data.sources repeats
    for where, line, raw, record in read_chunk(chunk, s.hf_split):
        counts["records_read"] += 1
        try:
            if isinstance(record, RecordError):
                raise record
            renamed = selected(record, s)
            if renamed is None:
                counts["records_filtered"] += 1
                continue
            example = split_record(renamed)
            rendered = render(record, s, tokenizer, example)
            for m in example.completion if example.kind == "chat" else ():
                if m.get("switched_off"):
                    counts[f"turns_off_{m['switched_off']}"] += 1  # by the flag that switched it off
            counts["turns_history_untrained"] += rendered.history_untrained
            pending.append((where, line, raw, rendered))
        except RecordError as exc:
            bad(exc if exc.where else exc.at(where), line, raw)
    for i in range(0, len(pending), TOKENIZE_BATCH):
        batch = pending[i: i + TOKENIZE_BATCH]
        for (where, line, raw, rendered), (ids, labels) in zip(batch, tokenize_rendered([b[3] for b in batch],
                                                                                         tokenizer, s.loss_on)):
            broken = mask_error(rendered, labels, s.loss_on)
            if broken is not None:
                bad(broken.at(where), line, raw)
                continue
            fitted = fit_length(ids, labels, s.max_seq_len, s.on_overlong)
            trained = count_trained(labels)
            if fitted is not None and len(fitted[0]) < len(ids) and trained and not count_trained(fitted[1]):
                fitted = None  # the prompt alone fills max_seq_len: nothing to train on, dropped as drop does
            if fitted is None:
                counts["examples_dropped"] += 1
                prompt = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX) if trained else 0
                if prompt >= s.max_seq_len:
                    counts["prompt_over_max_seq_len"] += 1
                    if prompt > out.longest_prompt[0]:
                        out.longest_prompt = [prompt, where]
                continue
            if len(fitted[0]) < len(ids):
                counts["examples_truncated"] += 1
            if count_trained(fitted[1]) == 0:
                bad(RecordError("no_trained_tokens", "no token to train on; fix: give the record an assistant answer",
                                where), line, raw)
                continue
            out.examples.append(fitted)
            out.held_out.append(held_out(where, s.eval_fraction))
            counts["records_kept" if not out.held_out[-1] else "records_held_out"] += 1
            n = 0 if out.held_out[-1] else copies(s.repeat, s.mix_seed, name, line)
            out.copies.append(n)
            counts["examples"] += n
    counts["records_rejected"] = sum(by_reason.values())
    out.rejects.sort(key=lambda r: r["line"])  # file order (token-level rejects are found after parse errors)
    out.counts = {**counts, "rejected_by_reason": dict(by_reason), "longest_prompt": out.longest_prompt}
    return out


def _list_column(values: list[list[int]]) -> pa.Array:
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def rows_table(examples: list, max_seq_len: int, packing: bool, source: int = 0) -> pa.Table:
    """Examples -> training rows (packed, or one example per row) in the prepared schema, of data.sources[source]."""
    rows = make_rows(examples, max_seq_len, packing)
    columns = [_list_column(getattr(rows, c)) for c in LIST_COLUMNS]
    columns.append(pa.array([sum(n) for n in rows.seq_lengths], pa.int32()))
    columns.append(pa.array([count_trained(lab) for lab in rows.labels], pa.int32()))
    columns.append(pa.array(np.full(len(rows.labels), source, dtype=np.int16)))
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def train_tables(result: ChunkResult, max_seq_len: int, packing: bool, source: int) -> list[pa.Table]:
    """A chunk's training rows: each use of a repeated record packed apart from its other uses (copy k holds the
    examples used more than k times), so that no row holds one example twice."""
    kept = [(e, n) for e, n in zip(result.examples, result.copies) if n]
    uses = max((n for _, n in kept), default=1)
    return [rows_table([e for e, n in kept if n > k], max_seq_len, packing, source) for k in range(uses)]
