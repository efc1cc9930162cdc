"""Input files: expand paths/globs/URIs, hash their content and cut them into chunks (`reading.py` reads one).

Planning runs on the driver in one streaming pass per file: it hashes the bytes (for the prepared
data's fingerprint) and cuts JSONL files into chunks of whole lines, remembering each chunk's first line
number so that a bad record is reported as ``file:line`` by whichever Ray task reads it. ``.jsonl.gz``
is one chunk per file (gzip cannot be entered mid-stream), a JSON array (``.json``) is cut at record boundaries from
an index made once per file (`jsonarray.py`; a ``.json.gz`` is one chunk), Parquet one chunk per row group, a
Hugging Face dataset one chunk per row range. Local paths and any URI pyarrow reads (``s3://``,
``gs://``, ``file://``) go through `pyarrow.fs`. This module does not import ray.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Optional

import pyarrow.fs as pafs

from raysft import storage
from raysft.data import jsonarray, jsonscan
from raysft.errors import UserError, format_error

FORMATS = {".jsonl.gz": "jsonl.gz", ".jsonl": "jsonl", ".json.gz": "json.gz", ".json": "json", ".parquet": "parquet"}
HF_ROWS_PER_CHUNK = 20_000


@dataclass(frozen=True)
class Chunk:
    source: str  # path or URI (or HF dataset id / folder)
    fmt: str  # jsonl | jsonl.gz | parquet | hf
    start: int  # byte offset (jsonl), row group (parquet), row (hf)
    end: int
    first_line: int  # line (jsonl, json) or row (parquet, hf) number of the chunk's first record, 1-based
    first_record: int = 0  # json: the chunk's first record's number in the array, 1-based
    index: int = 0  # position in the plan: names the chunk's stats and rejects files
    origin: int = 0  # which of data.sources (data/mixing.py) it is part of

    def as_row(self) -> dict:
        return asdict(self)


def file_format(path: str) -> Optional[str]:
    return next((fmt for ext, fmt in FORMATS.items() if path.endswith(ext)), None)


def expand(specs: list[str], key: str) -> list[str]:
    """Paths, globs and URIs -> the sorted files they name; a spec that names nothing is an error."""
    out: list[str] = []
    problems = []
    for spec in specs:
        if storage.is_uri(spec):
            fs, path = storage.filesystem(spec)
            if any(c in path for c in "*?["):
                base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                found = sorted(storage.scheme(spec) + i.path for i in infos
                               if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
            else:
                found = [spec] if fs.get_file_info(path).type == pafs.FileType.File else []
        elif any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(spec):
            problems.append(format_error(key, "is a directory, not a data file", spec,
                                         f"name the files in it, e.g. {os.path.join(spec, '*.jsonl')}"))
            continue
        else:
            found = [spec] if os.path.isfile(spec) else []
        if not found:
            problems.append(format_error(key, "no file matches", spec, "check the path or glob (relative paths are "
                                                                       "taken from the current directory)"))
        for p in found:
            if file_format(p) is None:
                problems.append(format_error(key, "unsupported file type", p,
                                             f"use one of {', '.join(FORMATS)}"))
            elif not has_records(p):
                problems.append(format_error(key, "has no records (the file is empty or only blank lines)", p,
                                             "give a file with one JSON object per line, or leave this one out"))
            elif p not in out:
                out.append(p)
    if problems:
        raise UserError("\n".join(problems))
    return out


def has_records(source: str) -> bool:
    """Whether a data file holds anything but blank lines (JSONL: up to its first non-blank byte; Parquet: its
    metadata). A damaged .jsonl.gz counts as having records: reading it reports the damage with its line."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(source)
    fmt = file_format(source)
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows > 0
    try:
        with fs.open_input_stream(path, compression=None) as raw:
            stream = gzip.GzipFile(fileobj=raw) if fmt.endswith(".gz") else raw
            while block := stream.read(storage.READ_BLOCK):
                if block.strip():
                    return True
    except (EOFError, OSError, zlib.error):
        return True
    return False


def _plan_jsonl(fs, path: str, source: str, chunk_bytes: int, h) -> tuple[list[Chunk], int]:
    """Hash the file and cut it at line ends roughly every `chunk_bytes`; the chunks and the file's lines."""
    chunks = []
    chunk_start, chunk_line = 0, 1
    pos = newlines = 0
    last_newline = True
    with fs.open_input_stream(path, compression=None) as f:
        while block := f.read(storage.READ_BLOCK):
            h.update(block)
            search_from = 0
            while chunk_start + chunk_bytes < pos + len(block):
                nl = block.find(b"\n", max(chunk_start + chunk_bytes - pos, search_from))
                if nl < 0:
                    break
                cut = pos + nl + 1
                chunks.append(Chunk(source, "jsonl", chunk_start, cut, chunk_line))
                chunk_start, chunk_line = cut, newlines + block.count(b"\n", 0, nl + 1) + 1
                search_from = nl + 1
            newlines += block.count(b"\n")
            pos += len(block)
            last_newline = block.endswith(b"\n")
    if pos > chunk_start:
        chunks.append(Chunk(source, "jsonl", chunk_start, pos, chunk_line))
    return chunks, newlines + (pos > 0 and not last_newline)


def _hash_file(fs, path: str, h) -> int:
    size = 0
    with fs.open_input_stream(path, compression=None) as f:
        while block := f.read(storage.READ_BLOCK):
            h.update(block)
            size += len(block)
    return size


def _gzip_line_count(source: str) -> int:
    fs, path = storage.filesystem(source)
    n, last = 0, b"\n"
    try:
        with fs.open_input_stream(path, compression=None) as raw, gzip.GzipFile(fileobj=raw) as f:
            while block := f.read(storage.READ_BLOCK):
                n += block.count(b"\n")
                last = block[-1:]
    except (EOFError, OSError, zlib.error):
        pass  # damaged: reading it reports where
    return n + (last != b"\n")


def _plan_json(fs, path: str, source: str, chunk_bytes: int, h, json_field: str, key: str, count: bool):
    """A .json/.json.gz file that holds an array: its chunks (cut from its record-boundary index) and records."""
    layout = jsonarray.sniff(source, json_field, key)
    gz = source.endswith(".gz")
    if layout.kind == "jsonl":  # JSON Lines under a .json name
        if not gz:
            return _plan_jsonl(fs, path, source, chunk_bytes, h)
        size = _hash_file(fs, path, h)
        return [Chunk(source, "jsonl.gz", 0, size, 1)], _gzip_line_count(source) if count else None
    size = _hash_file(fs, path, h)
    if gz:  # one chunk, streamed: its records counted (a second pass) only for data.sources' weights
        records = sum(isinstance(e, jsonscan.Element) for e in jsonscan.elements(
            source, 0, 0, layout.line, 1, True, layout.offset)) if count else None
        return [Chunk(source, "json.gz", layout.offset, size, layout.line, 1)], records
    ix = jsonarray.index(source, h.hexdigest(), layout, size, key)
    if not ix.records and not ix.damaged:
        raise UserError(format_error(key, "has no records (an empty array)", source, "leave the file out"))
    return [Chunk(source, "json", s, e, line, record) for s, e, line, record in jsonarray.ranges(ix, chunk_bytes)] \
        or [Chunk(source, "json", layout.offset, ix.end, layout.line, 1)], ix.records


def plan(files: list[str], chunk_bytes: int, count: bool = False, json_field: str = "",
         key: str = "data.train_files") -> tuple[list[Chunk], list[dict]]:
    """Chunks to read, and each file's {path, bytes, sha256, lines or rows} for the fingerprint (and for
    data.sources' weights: a .jsonl.gz or .json.gz is decompressed to count its records only with `count`).
    `json_field` is data.json_field, for .json files that hold an object; `key` names the files' config key."""
    import pyarrow.parquet as pq

    chunks: list[Chunk] = []
    inputs = []
    for source in files:
        fs, path = storage.filesystem(source)
        fmt = file_format(source)
        h = hashlib.sha256()
        if fmt in ("json", "json.gz"):
            file_chunks, records = _plan_json(fs, path, source, chunk_bytes, h, json_field, key, count)
            chunks += file_chunks
            size = fs.get_file_info(path).size
            inputs.append({"path": source, "bytes": size, "sha256": h.hexdigest(),
                           **({"records": records} if records is not None else {}),
                           **({"json_field": json_field} if json_field else {})})
            continue
        if fmt == "jsonl":
            file_chunks, records = _plan_jsonl(fs, path, source, chunk_bytes, h)
            chunks += file_chunks
            size = fs.get_file_info(path).size
        else:
            size = _hash_file(fs, path, h)
            if fmt == "jsonl.gz":
                chunks.append(Chunk(source, fmt, 0, size, 1))
                records = _gzip_line_count(source) if count else None
            else:
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
                row = 1
                for g in range(meta.num_row_groups):
                    chunks.append(Chunk(source, fmt, g, g + 1, row))
                    row += meta.row_group(g).num_rows
                records = meta.num_rows
        inputs.append({"path": source, "bytes": size, "sha256": h.hexdigest(),
                       **({"records": records} if records is not None else {})})
    return [Chunk(**{**c.as_row(), "index": i}) for i, c in enumerate(chunks)], inputs


def load_hf(name: str, split: str):
    """A `datasets.Dataset` from a folder saved with `save_to_disk` or a hub id (cached by `datasets`)."""
    import datasets

    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(format_error("data.hf_split", f"split not in {name}", split,
                                             f"use one of {', '.join(ds)}"))
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, split=split)


def plan_hf(name: str, split: str) -> tuple[list[Chunk], list[dict]]:
    ds = load_hf(name, split)
    n = len(ds)
    chunks = [Chunk(name, "hf", s, min(s + HF_ROWS_PER_CHUNK, n), s + 1, i)
              for i, s in enumerate(range(0, n, HF_ROWS_PER_CHUNK))]
    return chunks, [{"path": f"{name}[{split}]", "records": n, "sha256": ds._fingerprint}]
