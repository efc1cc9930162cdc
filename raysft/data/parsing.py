"""A line of input -> a JSON object, or the `RecordError` that says what is wrong with it: the parsing half of
reading records (`records.py` validates what the object holds). A key given twice in one object is refused (JSON
would keep the last value silently), at C speed for the common case. This module imports neither ray nor torch.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from raysft.errors import UserError


class RecordError(UserError, ValueError):
    """A bad record: `reason` is a short code for counting, the message says what and how to fix it."""

    def __init__(self, reason: str, message: str, where: str = ""):
        self.reason = reason
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, where: str) -> "RecordError":
        """The same error, located (e.g. ``data/train.jsonl:12``)."""
        return RecordError(self.reason, self.message, where)

    def __reduce__(self):  # picklable across Ray tasks
        return (RecordError, (self.reason, self.message, self.where))


def _no_duplicate_keys(pairs: list) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RecordError("duplicate_key", f"key {key!r} appears twice in one object (JSON keeps only the last, "
                                           "so a value would be lost); fix: give each key once")
    return value


_ENCODE = json.JSONEncoder(check_circular=False).encode  # a parsed value is never circular


def loads(line: str) -> Any:
    """`json.loads` that refuses an object with a key twice, at C speed for the common case.

    A key given twice is lost in the parsed value, and with it at least one structural colon: the value written back
    (`json.dumps` escapes no colon) has fewer colons than the line. Without a lost key the counts are equal, since
    every other colon is a character of a string, unless written as the escape \\u003a; only then, or when the counts
    differ, is the line parsed again with a hook on every object that names the key.
    """
    value = json.loads(line)
    if "{" not in line or ("\\u003" not in line and line.count(":") == _ENCODE(value).count(":")):
        return value
    return json.loads(line, object_pairs_hook=_no_duplicate_keys)


def parse_line(line: str | bytes, fix: str = "one JSON object per line") -> dict:
    """A JSONL line -> its object. BOM and CR are tolerated; anything but a JSON object is a RecordError.

    >>> parse_line('\\ufeff{"text": "hi"}\\r')
    {'text': 'hi'}
    """
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("invalid_utf8",
                              f"not valid UTF-8 at byte {exc.start}; fix: save the file as UTF-8") from None
    line = line.lstrip("\ufeff").strip()
    try:
        value = loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}; "
                                          f"fix: {fix}") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise RecordError("too_deep", "nested too deeply for a JSON parser (more than ~1,000 levels of [ or {); "
                                      "fix: flatten the record") from None
    if not isinstance(value, dict):
        raise RecordError("not_an_object", f"a JSON {type(value).__name__} is not a record "
                                           f"(got {shorten(value)}); fix: {fix}")
    return value


def shorten(value: Any, limit: int = 60) -> str:
    """`value` as JSON, cut to `limit` characters for a message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."




def drop_nulls(row: Mapping) -> dict:
    """Columnar sources (Parquet, datasets) fill absent fields with None: treat those as absent."""
    return {k: v for k, v in row.items() if v is not None}
