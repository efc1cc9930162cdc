"""The scanner under `jsonarray`: a JSON array's elements found by their bytes, block by block (`Elements`), the
bytes of a file or a range of it (`blocks`), and one chunk's elements with the damage where a file stops early
(`elements`). Strings are skipped by one regular expression in C and brackets counted; `json`'s C `raw_decode` skips
whole elements where it can. This module does not import ray.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from raysft import storage

# a whole string (escapes included), a structural character, or the quote of a string the buffer cuts short
TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},:]|"', re.S)
WS = b" \t\r\n"
_RAW = json.JSONDecoder().raw_decode
_SPACES = re.compile(rb"[ \t\r\n]*")


def skip_ws(data: bytes, i: int) -> int:
    return _SPACES.match(data, i).end()


@dataclass
class Element:
    record: int  # 1-based, in the array
    line: int  # of the element's first byte, 1-based
    start: int  # absolute byte offsets [start, end)
    end: int
    data: bytes


@dataclass
class Damage:
    after: int  # complete records before it
    line: int  # where reading stopped
    detail: str


class Elements:
    """Push scanner of one array's elements, from the byte just after its ``[`` (or any element boundary in it).

    `feed` takes the next bytes and returns the elements they complete; `finish` says the bytes ended, returns the
    last element (when it is whole) and whether the array was closed. Memory holds one element at most (plus a
    block)."""

    def __init__(self, offset: int, line: int, record: int):
        self.buf = b""
        self.base = offset  # absolute offset of buf[0]
        self.pos = 0  # where tokenizing resumes in buf
        self.seg = 0  # where the current element's bytes begin in buf (after the last separator)
        self.depth = 0
        self.closed: Optional[int] = None  # absolute offset just after the array's closing ]
        self.record = record - 1  # records emitted so far, counted from the first one's number
        self.line = line  # the line of buf[self.counted]
        self.counted = 0
        self.in_string = False
        self.fresh = True  # at an element's start (after [ or a comma): json may skip it whole

    def _line_at(self, i: int) -> int:
        self.line += self.buf.count(b"\n", self.counted, i)
        self.counted = i
        return self.line

    def _emit(self, end: int, out: list) -> None:
        data = self.buf[self.seg:end]
        stripped = data.lstrip(WS)
        if stripped.strip(WS):
            start = self.seg + len(data) - len(stripped)
            self.record += 1
            stripped = stripped.rstrip(WS)
            out.append(Element(self.record, self._line_at(start), self.base + start,
                               self.base + start + len(stripped), stripped))

    def feed(self, block: bytes) -> list[Element]:
        out: list[Element] = []
        if self.closed is not None:
            return out
        self.buf += block
        self.in_string = False
        buf, pos = self.buf, self.pos
        text = None  # the buffer as latin-1 (one character per byte) for json's raw_decode, made when first needed
        while True:
            if self.fresh and self.depth == 0:  # an element begins: json (C) finds its end, when it is whole here
                pos = skip_ws(buf, pos)
                if pos < len(buf) and buf[pos] in b'{["':
                    text = text if text is not None else buf.decode("latin-1")
                    try:
                        pos = _RAW(text, pos)[1]
                        self.fresh = False
                        continue
                    except ValueError:  # cut by the buffer's end, or not valid JSON: the tokens below decide
                        pass
            m = TOKEN.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            c = buf[m.start()]
            self.fresh = False
            if c == 0x22:  # "
                if m.end() - m.start() == 1:  # a string the buffer cuts short: wait for more bytes
                    pos, self.in_string = m.start(), True
                    break
            elif c in b"[{":
                self.depth += 1
            elif c in b"]}":
                if self.depth == 0:
                    if c == 0x5D:  # the array's own ]
                        self._emit(m.start(), out)
                        self.closed = self.base + m.end()
                        pos = m.end()
                        break
                    pos = m.end()
                    continue  # a stray } between elements: left to the element's parse to refuse
                self.depth -= 1
            elif c == 0x2C and self.depth == 0:  # ,
                self._emit(m.start(), out)
                self.seg, self.fresh = m.end(), True
            pos = m.end()
        self.pos = pos
        if self.closed is None:  # keep only the current element's bytes
            cut = min(self.seg, self.pos)
            self._line_at(cut)
            self.buf, self.base = self.buf[cut:], self.base + cut
            self.pos, self.seg, self.counted = self.pos - cut, self.seg - cut, 0
        return out

    def finish(self, file_end: bool) -> tuple[list[Element], Optional[Damage]]:
        """The bytes ended: at the end of a chunk's range (`file_end` False: its last element is whole), or of the
        file (then an array not closed is damage)."""
        out: list[Element] = []
        if self.closed is not None:
            return out, None
        whole = self.depth == 0 and not self.in_string
        if whole:
            self._emit(len(self.buf), out)
        if not file_end:
            return out, None
        if whole:
            return out, Damage(self.record, self._line_at(len(self.buf)),
                               "the array is not closed (no ']' after the last record)")
        line = self._line_at(len(self.buf) - len(self.buf[self.seg:].lstrip(WS)))  # where the cut record begins
        return out, Damage(self.record, line, f"cut short inside record {self.record + 1} (line {line})")


def blocks(source: str, start: int = 0, end: Optional[int] = None, gz: bool = False) -> Iterator[bytes]:
    """The bytes of `source` from `start` to `end` (a .json.gz: decompressed, whole), a block at a time."""
    fs, path = storage.filesystem(source)
    if gz:
        with fs.open_input_stream(path, compression=None) as raw, gzip.GzipFile(fileobj=raw) as f:
            while block := f.read(storage.READ_BLOCK):
                yield block
        return
    with fs.open_input_file(path) as f:
        f.seek(start)
        left = (end if end is not None else f.size()) - start
        while left > 0 and (block := f.read(min(storage.READ_BLOCK, left))):
            left -= len(block)
            yield block



def elements(source: str, start: int, end: int, line: int, record: int, gz: bool,
             offset: int = 0) -> Iterator[Element | Damage]:
    """The elements of one chunk's byte range (a .json.gz: of the whole array, from `offset`), then a `Damage` when
    the file ends inside the array."""
    scanner = Elements(offset if gz else start, line, record)
    skip = offset if gz else 0
    if gz:
        file_end = True
    else:
        fs, path = storage.filesystem(source)
        file_end = end >= fs.get_file_info(path).size
    try:
        for block in blocks(source, start, end, gz):
            if skip:
                block, skip = block[skip:], max(0, skip - len(block))
            yield from scanner.feed(block)
            if scanner.closed is not None:
                return
    except (EOFError, OSError, zlib.error) as exc:  # a .json.gz cut short or damaged
        detail = f"{'zlib.error' if isinstance(exc, zlib.error) else type(exc).__name__}: {exc}"
        yield Damage(scanner.record, scanner._line_at(len(scanner.buf)),
                     f"the compressed file is cut short or damaged ({detail})")
        return
    rest, damage = scanner.finish(file_end)
    yield from rest
    if damage is not None:
        yield damage
