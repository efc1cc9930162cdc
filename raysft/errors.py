"""The user-facing error type and its one-line format.

Every mistake a user can make (a bad config value, a bad record, a missing file) is raised as a
`UserError`, whose text is `where: what (got X). fix: how`. The CLI prints it as one line and exits
non-zero, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def format_error(where: str, what: str, got: object = None, fix: str = "") -> str:
    """`where: what (got X). fix: how`, leaving out the parts that are empty.

    >>> format_error("train.lr", "must be > 0", -1, "use e.g. 2e-5")
    'train.lr: must be > 0 (got -1). fix: use e.g. 2e-5'
    """
    text = f"{where}: {what}" if where else what
    if got is not None:
        text += f" (got {got!r})"
    if fix:
        text += f". fix: {fix}"
    return text


class UserError(Exception):
    """A mistake in the user's input; its message is complete and meant to be shown as is."""


CAUSE_MAX_CHARS = 160  # a library's message quoted inside ours: its first line, about a terminal line long


def cause(exc: BaseException) -> str:
    """`Type: first line of the message`, to quote a library's error in a UserError's fix.

    >>> cause(OSError("no such file\\nmore detail"))
    'OSError: no such file'
    """
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:CAUSE_MAX_CHARS] if lines else ''}"
