"""One input record -> (prompt, completion), validated; the only place that knows the input formats.

Formats, detected per record:

- preference: ``chosen``/``rejected`` message lists (or strings), with or without an explicit ``prompt``
- ``messages``: one conversation
- ShareGPT ``conversations``: ``{"from": "human"|"gpt"|"system", "value": ...}``
- ``prompt``/``completion``: message lists, or plain strings (joined as text, no template)
- ``text``: already-prepared text, passed through and trained on in full

`split_record` returns an `Example`: either ``kind="chat"`` with two message lists, or ``kind="text"``
with two strings. Anything malformed raises `RecordError` with a reason code (for counting) and a
message that names the field. This module imports neither ray nor torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from raysft.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool"}
FORMATS_HINT = "use one of: chosen/rejected, messages, conversations, prompt/completion, text"


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


Message = dict  # {"role": str, "content": str}


@dataclass(frozen=True)
class Example:
    """What a record means: ``chat`` (message lists) or ``text`` (strings, no template)."""

    kind: str
    prompt: Any
    completion: Any


def parse_line(line: str | bytes) -> dict:
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
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}; "
                                          "fix: one JSON object per line") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise RecordError("too_deep", "nested too deeply for a JSON parser (more than ~1,000 levels of [ or {); "
                                      "fix: flatten the record") from None
    if not isinstance(value, dict):
        raise RecordError("not_an_object", f"a JSON {type(value).__name__} is not a record "
                                           f"(got {_short(value)}); fix: one JSON object per line")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _content(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI-style parts: [{"type": "text", "text": ...}]
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError("bad_message", f"{field}[{i}]: only text parts are supported "
                                                 f"(got {_short(part)}); fix: give content as a string")
            parts.append(part["text"])
        return "".join(parts)
    raise RecordError("bad_message", f"{field}: content must be a string (got {_short(value)}); "
                                     "fix: give each message a string content")


def messages_from(value: Any, field: str, sharegpt: bool = False) -> list[Message]:
    """Validated list of {"role", "content"} from a record field (ShareGPT `from`/`value` mapped).

    >>> messages_from([{"from": "human", "value": "hi"}], "conversations", sharegpt=True)
    [{'role': 'user', 'content': 'hi'}]
    """
    if not isinstance(value, list):
        raise RecordError("bad_type", f"{field}: must be a list of messages (got {_short(value)}); "
                                      'fix: [{"role": "user", "content": "..."}, ...]')
    if not value:
        raise RecordError("empty_conversation", f"{field}: empty conversation; fix: give at least one "
                                                "user and one assistant message")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise RecordError("bad_message", f"{where}: a message must be an object (got {_short(msg)})")
        if role_key not in msg or content_key not in msg:
            missing = role_key if role_key not in msg else content_key
            raise RecordError("bad_message", f"{where}: message has no {missing!r} (got {_short(msg)}); "
                                             f"fix: every message needs {role_key!r} and {content_key!r}")
        role = msg[role_key]
        if role not in roles:
            raise RecordError("unknown_role", f"{where}: unknown role {role!r}; fix: use one of "
                                              f"{', '.join(roles)}")
        out.append({"role": roles[role], "content": _content(msg[content_key], f"{where}.{content_key}")})
    return out


def _completion_must_start_with_assistant(prompt: list, completion: list, field: str) -> Example:
    if not completion:
        raise RecordError("no_completion", f"{field}: nothing after the prompt to train on; "
                                           "fix: end the conversation with an assistant message")
    if completion[0]["role"] != "assistant":
        raise RecordError("completion_not_assistant",
                          f"{field}: the completion starts with a {completion[0]['role']!r} turn, not an assistant "
                          "turn; fix: make the first message after the prompt an assistant message")
    return Example("chat", prompt, completion)


def split_conversation(messages: list[Message], field: str = "messages") -> Example:
    """`messages`: the prompt is everything before the first assistant message.

    >>> split_conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]).prompt
    [{'role': 'user', 'content': '2+2?'}]
    """
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant":
            return Example("chat", messages[:k], messages[k:])
    raise RecordError("no_assistant", f"{field}: no assistant message; fix: add the assistant's answer")


def common_prefix_len(a: list, b: list) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _string_prompt(chosen: str, rejected: str) -> str:
    """TRL's `extract_prompt` for string pairs: the common prefix, cut before a trailing space."""
    i = 0
    for i in range(min(len(chosen), len(rejected))):
        if chosen[i] != rejected[i]:
            if chosen[i - 1] == " ":
                i -= 1
            break
    return chosen[:i]


def split_preference(record: Mapping) -> Example:
    """`chosen`/`rejected` (+ optional `prompt`) -> prompt and the chosen completion; `rejected` is dropped.

    Without `prompt`, the prompt is the longest common prefix of whole messages; when that covers all of
    `chosen`, the prompt ends before chosen's last assistant message. With a `prompt` that `chosen`
    already begins with, chosen is read as a full conversation (the prompt is not repeated).
    """
    if "chosen" not in record:
        raise RecordError("missing_field", "preference record has 'rejected' but no 'chosen'; fix: add 'chosen'")
    if "rejected" not in record:
        raise RecordError("missing_field", "preference record has 'chosen' but no 'rejected'; "
                                           "fix: add 'rejected', or rename 'chosen' to 'messages'")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and (prompt is None or isinstance(prompt, str)):
        if prompt is None:
            prompt = _string_prompt(chosen, rejected)
            return Example("text", prompt, chosen[len(prompt):])
        return Example("text", prompt, chosen[len(prompt):] if chosen.startswith(prompt) else chosen)
    chosen = messages_from(chosen, "chosen")
    rejected = messages_from(rejected, "rejected")
    if prompt is not None:
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else messages_from(prompt, "prompt")
        if chosen[: len(prompt)] == prompt:  # implicit form that also carries the prompt
            chosen = chosen[len(prompt):]
        return _completion_must_start_with_assistant(prompt, chosen, "chosen")
    n = common_prefix_len(chosen, rejected)
    if n == len(chosen):  # identical pair (or chosen is a prefix of rejected)
        last = max((k for k, m in enumerate(chosen) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RecordError("no_assistant", "chosen: no assistant message; fix: add the assistant's answer")
        n = last
    return _completion_must_start_with_assistant(chosen[:n], chosen[n:], "chosen")


def split_record(record: Mapping) -> Example:
    """Detect the record's format and split it into prompt and completion (see module doc)."""
    if "chosen" in record or "rejected" in record:
        return split_preference(record)
    if "messages" in record:
        return split_conversation(messages_from(record["messages"], "messages"))
    if "conversations" in record:
        return split_conversation(messages_from(record["conversations"], "conversations", sharegpt=True),
                                  "conversations")
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise RecordError("missing_field", f"record has {'prompt' if key == 'completion' else 'completion'!r}"
                                                   f" but no {key!r}; fix: add {key!r}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise RecordError("no_completion", "completion: empty; fix: give the text to train on")
            return Example("text", prompt, completion)
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else messages_from(prompt, "prompt")
        completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else messages_from(completion, "completion"))
        return _completion_must_start_with_assistant(prompt, completion, "completion")
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise RecordError("bad_type", f"text: must be a non-empty string (got {_short(record['text'])})")
        return Example("text", "", record["text"])
    keys = ", ".join(map(repr, list(record)[:8])) or "none"
    raise RecordError("unknown_format", f"no known fields (got keys {keys}); fix: {FORMATS_HINT}")


def drop_nulls(row: Mapping) -> dict:
    """Columnar sources (Parquet, datasets) fill absent fields with None: treat those as absent."""
    return {k: v for k, v in row.items() if v is not None}
