"""`data.where`: a small filter on record fields, applied after `data.columns` renames them and before the eval split.

A mapping of field -> condition, every condition must hold: a plain value is equality; a mapping holds operators
(``==``, ``!=``, ``in``, ``not in``, and ``<``, ``<=``, ``>``, ``>=`` on numbers). A field the record lacks makes its
condition false. Records it leaves out are counted (``records_filtered``), per source too.

    where: {label: true}                                # TRL's unpaired (KTO) records: the desirable ones
    where: {score_chosen: {">=": 8}, source: {in: [a, b]}}

Records that carry a KTO-style ``label`` (``false`` marks an undesirable completion) are refused while `data.where`
is unset, so an undesirable completion is never trained by accident: ``where: {label: true}`` says what to do with
them, ``where: {}`` trains them all. This module imports neither ray nor torch.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Mapping, Optional

from raysft.data.parsing import RecordError, shorten

NUMERIC = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b, **NUMERIC}
LABEL = "label"
EXAMPLE = 'e.g. {label: true} or {score: {">=": 4}, source: {in: [a, b]}}'


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_where(where: Any, key: str, bad) -> None:
    """`data.where`'s (or a source's) config problems, through `bad(key, what, got, fix)`."""
    if where is None:
        return
    if not isinstance(where, Mapping):
        bad(key, "must be a mapping of record field to condition", where, EXAMPLE)
        return
    for name, cond in where.items():
        at = f"{key}.{name}"
        if not isinstance(cond, Mapping):
            continue  # equality with any value
        if not cond:
            bad(at, "has no condition", cond, EXAMPLE)
        for op, value in cond.items():
            if op not in OPS:
                bad(f"{at}.{op}", "is not an operator", op, f"use one of {', '.join(OPS)}")
            elif op in NUMERIC and not _number(value):
                bad(f"{at}.{op}", "compares numbers", value, f'e.g. {{"{op}": 4}}')
            elif op in ("in", "not in") and not isinstance(value, list):
                bad(f"{at}.{op}", "needs a list", value, f"e.g. {{{op}: [a, b]}}")


def matches(record: Mapping, where: Mapping) -> bool:
    """Whether the (renamed) record passes `where`; a field compared with a number that holds no number is a bad
    record naming both.

    >>> matches({"score": 9, "label": True}, {"label": True, "score": {">=": 8}}), matches({}, {"label": True})
    (True, False)
    """
    for name, cond in where.items():
        if name not in record:
            return False
        value = record[name]
        for op, target in (cond.items() if isinstance(cond, Mapping) else (("==", cond),)):
            if op in NUMERIC and not _number(value):
                raise RecordError("where_not_a_number", f"{name}: {shorten(value)}, and data.where compares it with "
                                                        f"{op} {target}; fix: give {name} as a number, or change "
                                                        "data.where")
            if not OPS[op](value, target):
                return False
    return True


def label_error(record: Mapping, where: Optional[Mapping]) -> Optional[RecordError]:
    """A KTO-style labelled record while data.where is unset: refused, so undesirable completions are never trained
    by accident."""
    if where is not None or LABEL not in record:
        return None
    return RecordError("unfiltered_label", f"the record has a {LABEL!r} ({shorten(record[LABEL])}: KTO's unpaired "
                                           "format, where false marks an undesirable completion) and data.where is "
                                           "not set, so every completion would be trained; fix: data.where: {label: "
                                           "true} to train the desirable ones, or data.where: {} to train them all")
