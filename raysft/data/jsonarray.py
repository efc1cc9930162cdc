"""JSON files that hold an array of records (`.json`, `.json.gz`): the original Alpaca release and most instruction sets
published as one file.

Such a file is never loaded whole. `Elements` (`jsonscan.py`) is a push scanner: fed the bytes after an array's
``[`` block by block, it finds each element's byte range and line from the JSON structure alone (strings are skipped
by one regular expression in C, brackets counted), and the element's bytes are then parsed by `json` like a JSONL
line. Planning (`sources.py`) scans a file once into a record-boundary index -- a cut point (byte offset, line,
record number) about every `INDEX_BYTES` -- cached by the file's SHA-256 and `data.json_field`, and cuts chunks at
those points so Ray Data spreads an array over cores and nodes as it does a JSONL file; a task reads its chunk's
byte range with the same scanner. A ``.json.gz`` is one chunk, streamed.

(A streaming parser such as ijson gives values, not the byte offsets that cutting a file into ranges needs; the
scanner gives the offsets, and `json` parses each record.)

A cut-short or damaged array keeps its complete records and ends with one ``damaged_file`` record error naming the
record and line where it stopped. A ``.json`` file that holds JSON Lines is read as JSONL; one that holds an object
is read at the array under `data.json_field` (as `datasets`' json loader's ``field``), or refused with that fix.
This module does not import ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Optional

from raysft import storage
from raysft.data.jsonscan import TOKEN, WS, Element, Elements, blocks, skip_ws
from raysft.errors import UserError, format_error

INDEX_BYTES = 64 << 10  # a cut point about this often: chunks of any size are cut from the one index
SNIFF_LINE_MAX = 64 << 20  # a first line longer than this is not taken for a JSON Lines record
INDEX_VERSION = 1


# ---------------------------------------------------------------------------------------------------------- sniffing


@dataclass
class Layout:
    """What a .json file holds: `kind` jsonl | array; for an array, where its first element begins."""

    kind: str
    offset: int = 0  # just after the array's [
    line: int = 1
    top: bool = True  # the array is the file's top-level value (not under data.json_field)


def _first_line(source: str, gz: bool) -> tuple[bytes, Optional[bool]]:
    """The file's bytes up to its first newline (at most SNIFF_LINE_MAX), and whether that is the whole file (None:
    a .json.gz damaged before its first newline)."""
    head = b""
    it = blocks(source, gz=gz)
    try:
        for block in it:
            nl = block.find(b"\n")
            if nl >= 0:
                head += block[:nl]
                rest = block[nl + 1:].strip(WS) or any(b.strip(WS) for b in it)
                return head, not rest
            head += block
            if len(head) > SNIFF_LINE_MAX:
                return head, False
    except (EOFError, OSError, zlib.error):  # a damaged .json.gz: reading it reports where
        return head, None
    return head, True


def sniff(source: str, json_field: str, key: str) -> Layout:
    """How to read the .json/.json.gz file `source`; a UserError names what it holds when it is neither JSON Lines
    nor an array (nor an object with `json_field`)."""
    gz = source.endswith(".gz")
    head, only_line = _first_line(source, gz)
    i = skip_ws(head, 3 if head.startswith(b"\xef\xbb\xbf") else 0)
    if i < len(head) and head[i] == 0x5B:  # [
        return Layout("array", i + 1, 1)
    if i >= len(head) and only_line is None:  # nothing could be decompressed: reading it reports the damage
        return Layout("array", 0, 1)
    if i >= len(head) or head[i] != 0x7B:  # not an object either
        raise UserError(format_error(key, "is not JSON Lines, a JSON array or an object holding one (it begins "
                                     f"{head[i:i + 20]!r})", source, "give records as JSON Lines or a JSON array"))
    if not json_field:
        try:
            first = json.loads(head)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            first = None
        if isinstance(first, dict) and not (only_line and _holds_records(first)):
            return Layout("jsonl")
    offset, line = _locate_field(source, gz, json_field, key)
    return Layout("array", offset, line, top=False)


def _holds_records(obj: dict) -> bool:
    """A one-object file that looks like a container of records rather than one record: a list of objects under
    a key no record shape uses."""
    from raysft.data.records import RECORD_FIELDS

    return not (set(obj) & set(RECORD_FIELDS)) and any(isinstance(v, list) and v and isinstance(v[0], dict)
                                                 for v in obj.values())


def _locate_field(source: str, gz: bool, json_field: str, key: str) -> tuple[int, int]:
    """The offset just after the [ of the top-level object's `json_field` array, and its line; else a UserError
    listing the object's keys."""
    depth, base, line, buf, pos = 0, 0, 1, b"", 0
    keys: dict = {}
    pending_key: Optional[str] = None
    after_colon, pos_colon = False, 0
    for block in blocks(source, gz=gz):
        buf += block
        for m in TOKEN.finditer(buf, pos):
            tok = m.group()
            if after_colon:  # the first token of a top-level value
                name = pending_key
                gap = buf[pos_colon:m.start()].strip(WS)
                kind = "array" if tok == b"[" and not gap else "object" if tok == b"{" and not gap else \
                    "string" if tok[:1] == b'"' and not gap else "value"
                keys[name] = kind
                if name == json_field and kind == "array":
                    return base + m.end(), line + buf.count(b"\n", 0, m.start())
                after_colon = False
            if tok == b'"':
                pos = m.start()
                break
            if tok[:1] == b'"':
                if depth == 1:
                    pending_key = json.loads(tok)
                continue
            if tok in (b"[", b"{"):
                depth += 1
            elif tok in (b"]", b"}"):
                depth -= 1
            elif tok == b":" and depth == 1 and pending_key is not None:
                after_colon, pos_colon = True, m.end()
        else:
            pos = len(buf)
        if not after_colon:
            line += buf.count(b"\n", 0, pos)
            buf, base, pos = buf[pos:], base + pos, 0
    arrays = [k for k, v in keys.items() if v == "array"]
    listed = ", ".join(f"{k!r} ({v})" for k, v in list(keys.items())[:12]) or "none"
    if json_field:
        return _raise(key, f"holds one JSON object with no array under data.json_field {json_field!r} (its keys: "
                           f"{listed})", source,
                      f"set data.json_field to the key of the records' array ({', '.join(map(repr, arrays))})"
                      if arrays else "give the records as a JSON array or JSON Lines")
    return _raise(key, f"holds one JSON object, not records (its keys: {listed})", source,
                  f"set data.json_field: {arrays[0]} to read the records in its array" if arrays else
                  "give the records as a JSON array or JSON Lines")


def _raise(key: str, what: str, source: str, fix: str):
    raise UserError(format_error(key, what, source, fix))


# ------------------------------------------------------------------------------------------------------------ index


@dataclass
class Index:
    """A file's record-boundary index: cut points (offset, line, record) of elements about every INDEX_BYTES, the
    records, and where the array ends (after its ], or the file's end when damaged)."""

    points: list = field(default_factory=list)
    records: int = 0
    end: int = 0
    damaged: bool = False


def cache_dir() -> str:
    root = os.environ.get("RAYSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "raysft")
    return os.path.join(root, "json-index")


def _nothing_after(source: str, offset: int, key: str) -> None:
    """A top-level array is the whole file: anything after its ] (a second array, a stray record) would be lost."""
    for block in blocks(source, offset):
        if block.strip(WS):
            _raise(key, f"has more after its array's closing ] (byte {offset})", source,
                   "give one array per file (or JSON Lines: one record per line)")


def index(source: str, sha256: str, layout: Layout, size: int, key: str) -> Index:
    """The index of `source` (whose content hashes to `sha256`), from the cache or made by one scan."""
    name = hashlib.sha256(f"{INDEX_VERSION}:{INDEX_BYTES}:{sha256}:{layout.offset}".encode()).hexdigest()[:32]
    path = os.path.join(cache_dir(), f"{name}.json")
    try:
        with open(path) as f:
            return Index(**json.load(f))
    except (OSError, ValueError, TypeError):
        pass
    scanner = Elements(layout.offset, layout.line, 1)
    out = Index()
    last_point, every = -INDEX_BYTES, INDEX_BYTES

    def take(elements: list[Element]) -> None:
        nonlocal last_point
        for e in elements:
            if e.start - last_point >= every:
                out.points.append((e.start, e.line, e.record))
                last_point = e.start
            out.records = e.record

    for block in blocks(source, layout.offset):
        take(scanner.feed(block))
        if scanner.closed is not None:
            break
    rest, damage = scanner.finish(file_end=True)
    take(rest)
    out.damaged = damage is not None
    out.end = scanner.closed if scanner.closed is not None else size
    if layout.top and scanner.closed is not None:
        _nothing_after(source, scanner.closed, key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        storage.write_atomic(path, json.dumps(out.__dict__))
    except OSError:
        pass  # a cache that cannot be written is only slower next time
    return out


def ranges(ix: Index, chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """(start, end, first line, first record) of each chunk: cut points about `chunk_bytes` apart; the last
    chunk ends where the array does."""
    cuts = []
    for start, line, record in ix.points:
        if not cuts or start - cuts[-1][0] >= chunk_bytes:
            cuts.append((start, line, record))
    return [(s, cuts[i + 1][0] if i + 1 < len(cuts) else ix.end, line, record)
            for i, (s, line, record) in enumerate(cuts)]
