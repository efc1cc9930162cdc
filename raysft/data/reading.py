"""Reading one chunk of the plan (`sources.py` makes it): its records, each with its file and line, in order.

A JSONL chunk is a byte range of whole lines, a JSON array's a byte range of whole records (`jsonarray.py`); a
``.jsonl.gz`` or ``.json.gz`` is streamed whole (a cut or damaged file keeps its
records before the damage and ends with one `RecordError` naming the line after the last good one); Parquet is
read a row group at a time, a Hugging Face dataset a row range at a time. Runs in the Ray Data tasks (and in the
driver's preflight). This module does not import ray.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Iterator

from raysft import storage
from raysft.data import jsonscan
from raysft.data.parsing import RecordError, drop_nulls, parse_line
from raysft.data.sources import Chunk, load_hf


def describe_chunk(chunk: Chunk) -> str:
    """Where a chunk's records are, for a message: ``file:lines A-B`` (JSONL), ``file:rows A-B`` (Parquet, HF)."""
    if chunk.fmt == "jsonl":
        fs, path = storage.filesystem(chunk.source)
        with fs.open_input_file(path) as f:
            f.seek(chunk.start)
            data = f.read(chunk.end - chunk.start)
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        return f"{chunk.source}:lines {chunk.first_line}-{chunk.first_line + max(lines - 1, 0)}"
    if chunk.fmt == "hf":
        return f"{chunk.source}:rows {chunk.first_line}-{chunk.end}"
    if chunk.fmt == "json":
        return (f"{chunk.source}:records from {chunk.first_record} (line {chunk.first_line}, bytes "
                f"{chunk.start}-{chunk.end})")
    if chunk.fmt == "parquet":
        return f"{chunk.source}:row group {chunk.start} (from row {chunk.first_line})"
    return f"{chunk.source} (the whole compressed file)"


def _lines(data: bytes, first_line: int) -> Iterator[tuple[int, bytes]]:
    for i, line in enumerate(data.split(b"\n")):
        if line.strip():  # blank lines (and a final newline) are not records
            yield first_line + i, line


class DamagedFile(Exception):
    """A compressed file that ends early or is corrupt after line `after` (its records up to there are good)."""

    def __init__(self, after: int, detail: str):
        self.after, self.detail = after, detail
        super().__init__(detail)


def _gzip_lines(source: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a .jsonl.gz, streamed; a cut or corrupt stream ends it with `DamagedFile`."""
    fs, path = storage.filesystem(source)
    n = 0
    try:
        with fs.open_input_stream(path, compression=None) as raw, gzip.GzipFile(fileobj=raw) as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    yield n, line
    except (EOFError, OSError, zlib.error) as exc:  # cut short (a partial download) or damaged bytes
        raise DamagedFile(n, f"{'zlib.error' if isinstance(exc, zlib.error) else type(exc).__name__}: {exc}") from None


def _parsed(numbered, source: str):
    try:
        yield from _parsed_lines(numbered, source)
    except DamagedFile as exc:
        where = f"{source}:{exc.after + 1}"
        yield where, exc.after + 1, "", RecordError(
            "damaged_file", f"the compressed file is cut short or damaged after line {exc.after} "
            f"({exc.detail}); the records before it are read. fix: download or compress the file again "
            f"(`gzip -t {os.path.basename(source)}` checks it)", where)


def _parsed_lines(numbered, source: str):
    for n, line in numbered:
        where = f"{source}:{n}"
        raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            yield where, n, raw, parse_line(line)
        except RecordError as exc:
            yield where, n, raw, exc.at(where)


def _array_records(chunk: Chunk):
    """The records of a JSON array's chunk, each located as ``file:record N (line L)``; a damaged file ends with one
    ``damaged_file`` error."""
    gz = chunk.fmt == "json.gz"
    for e in jsonscan.elements(chunk.source, chunk.start, chunk.end, chunk.first_line, chunk.first_record, gz,
                                chunk.start if gz else 0):
        if isinstance(e, jsonscan.Damage):
            where = f"{chunk.source}:record {e.after + 1} (line {e.line})"
            yield where, e.after + 1, "", RecordError(
                "damaged_file", f"the JSON array is cut short or damaged: {e.detail}; the {e.after} records before "
                "it are read. fix: download the file again, or repair it (`python -m json.tool FILE` names the "
                "first error)", where)
            return
        where = f"{chunk.source}:record {e.record} (line {e.line})"
        raw = e.data.decode("utf-8", errors="replace")
        try:
            yield where, e.record, raw, parse_line(e.data, "make each element of the array a JSON object")
        except RecordError as exc:
            yield where, e.record, raw, exc.at(where)


def read_chunk(chunk: Chunk, hf_split: str = "train") -> Iterator[tuple[str, object]]:
    """(where, line or row number, raw text, record dict or RecordError) for each record of the chunk, in order."""
    if chunk.fmt == "jsonl":
        fs, path = storage.filesystem(chunk.source)
        with fs.open_input_file(path) as f:
            f.seek(chunk.start)
            data = f.read(chunk.end - chunk.start)
        yield from _parsed(_lines(data, chunk.first_line), chunk.source)
        return
    if chunk.fmt == "jsonl.gz":  # streamed: memory stays flat whatever the file's size
        yield from _parsed(_gzip_lines(chunk.source), chunk.source)
        return
    if chunk.fmt in ("json", "json.gz"):
        yield from _array_records(chunk)
        return
    if chunk.fmt == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(chunk.source)
        with fs.open_input_file(path) as f:
            rows = pq.ParquetFile(f).read_row_group(chunk.start).to_pylist()
    else:
        rows = load_hf(chunk.source, hf_split).select(range(chunk.start, chunk.end)).to_list()
    for i, row in enumerate(rows):
        row = drop_nulls(row)
        n = chunk.first_line + i
        yield f"{chunk.source}:row {n}", n, json.dumps(row, ensure_ascii=False, default=str), row
