"""Chat transcripts kept in one string (HH-RLHF's ``\n\nHuman: ...\n\nAssistant: ...``), read as turns under
`data.transcript_roles`. This module imports neither ray nor torch.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Optional

from raysft.data.parsing import RecordError, shorten

TRANSCRIPT_FIELDS = ("chosen", "rejected", "text", "prompt", "completion")


def from_transcript(text: str, roles: Mapping[str, str], field: str) -> Optional[list[dict]]:
    r"""A chat transcript kept in one string (HH-RLHF's ``\n\nHuman: ...\n\nAssistant: ...``) -> its turns, the
    speakers named by `roles` (`data.transcript_roles`, e.g. ``{Human: user, Assistant: assistant}``); None when no
    speaker starts a turn in it. A turn begins at the start of the text or after a blank line.

    >>> from_transcript("\n\nHuman: Hi\n\nAssistant: Hello!", {"Human": "user", "Assistant": "assistant"}, "chosen")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _speakers(tuple(roles)).split(text)
    if len(parts) < 3:
        return None
    if parts[0].strip():
        raise RecordError("bad_transcript", f"{field}: text before the first speaker ({shorten(parts[0])}); fix: "
                                            f"start it with one of {', '.join(f'{n}:' for n in roles)}, or remove "
                                            "data.transcript_roles")
    return [{"role": roles[name], "content": body.strip()} for name, body in zip(parts[1::2], parts[2::2])]


@functools.lru_cache(maxsize=8)
def _speakers(names: tuple) -> re.Pattern:
    return re.compile(r"(?:^|\n\n)(" + "|".join(map(re.escape, names)) + r"):[ \t]?")


def transcripts(record: Mapping, roles: Mapping[str, str]) -> Mapping:
    """A record whose string fields hold transcripts, with those fields as message lists (a `text` transcript as
    `messages`); other records as they are."""
    out = None
    for key in TRANSCRIPT_FIELDS:
        if isinstance(record.get(key), str):
            turns = from_transcript(record[key], roles, key)
            if turns is not None:
                out = dict(record) if out is None else out
                out["messages" if key == "text" else key] = turns
                if key == "text":
                    del out["text"]
    return record if out is None else out
