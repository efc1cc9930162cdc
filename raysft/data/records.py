"""One input record -> (prompt, completion), validated; the only place that knows the input formats.

Formats, detected per record:

- preference: ``chosen``/``rejected`` message lists (or strings), with or without an explicit ``prompt``
- ``messages``: one conversation
- ShareGPT ``conversations``: ``{"from": "human"|"gpt"|"system", "value": ...}``
- ``prompt``/``completion``: message lists, or plain strings (joined as text, no template)
- ``text``: already-prepared text, passed through and trained on in full
- Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system``: a user turn (the instruction, then
  a blank line and the input when there is one) and the assistant's answer

Plain text (string prompt/completion, string chosen/rejected, ``text``) is ended with the tokenizer's EOS token
when tokenized, trained, so a model learns to stop (as TRL does). `rename` applies ``data.columns``: a dataset's
own field names, message keys and role values mapped onto these.

`split_record` returns an `Example`: either ``kind="chat"`` with two message lists (and the record's
``tools``, JSON schemas), or ``kind="text"`` with two strings. A message is ``{"role", "content"}`` plus, where
the record has them: ``tool_calls`` (assistant; OpenAI form, ``arguments`` parsed to an object),
``reasoning_content`` (assistant; also taken from a ``<think>...</think>`` block that opens the content), and
``tool_call_id``/``name`` (tool). Anything malformed raises `RecordError` with a reason code (for counting) and a
message that names the field. This module imports neither ray nor torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from raysft.data.messages import (  # noqa: F401  (re-exported: the record-level names)
    MESSAGE_FIELDS,
    ROLE_VALUES,
    THINK_CLOSE,
    THINK_OPEN,
    Message,
    messages_from,
    tools_from,
)
from raysft.data.parsing import RecordError, shorten

FORMATS_HINT = "use one of: chosen/rejected, messages, conversations, prompt/completion, text, instruction/output"
# data.columns: raysft's names a dataset may call otherwise
RECORD_FIELDS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion", "text", "instruction",
                 "input", "output", "system", "tools", "chat_template_kwargs")




@dataclass(frozen=True)
class Example:
    """What a record means: ``chat`` (message lists) or ``text`` (strings, no template)."""

    kind: str
    prompt: Any
    completion: Any
    tools: Optional[list] = None  # JSON schemas of the functions the assistant may call (chat only)
    template_kwargs: Optional[dict] = None  # the record's own chat_template_kwargs (chat only), as TRL reads them


def _check_answers(completion: list, field: str, offset: int = 0) -> None:
    """Every assistant turn of the completion has something to train besides its end-of-turn token, and one at
    least is not switched off by a training flag."""
    turns = [m for m in completion if m["role"] == "assistant"]
    if turns and all(m.get("switched_off") for m in turns):
        flags = sorted({m["switched_off"] for m in turns})
        raise RecordError("all_turns_switched_off", f"{field}: every assistant turn is switched off ("
                                                    f"{', '.join(flags)}), so nothing would be trained; fix: switch "
                                                    "one on, or leave the record out")
    for k, msg in enumerate(completion):
        if msg["role"] == "assistant" and not (msg["content"] or msg.get("tool_calls") or msg.get("reasoning_content")):
            raise RecordError("empty_answer", f"{field}[{offset + k}]: an assistant message with empty content, no "
                                              "tool_calls and no reasoning: nothing to train but the end of the turn; "
                                              "fix: give the answer, or drop the message")


def _completion_must_start_with_assistant(prompt: list, completion: list, field: str, offset: int = 0) -> Example:
    """`offset`: where the completion starts in `field` (to name a message by its index there)."""
    if not completion:
        raise RecordError("no_completion", f"{field}: nothing after the prompt to train on; "
                                           "fix: end the conversation with an assistant message")
    if completion[0]["role"] != "assistant":
        raise RecordError("completion_not_assistant",
                          f"{field}: the completion starts with a {completion[0]['role']!r} turn, not an assistant "
                          "turn; fix: make the first message after the prompt an assistant message")
    _check_answers(completion, field, offset)
    return Example("chat", prompt, completion)


def split_conversation(messages: list[Message], field: str = "messages") -> Example:
    """`messages`: the prompt is everything before the first assistant message.

    >>> split_conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]).prompt
    [{'role': 'user', 'content': '2+2?'}]
    """
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant":
            _check_answers(messages[k:], field, k)
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
        offset = len(prompt) if chosen[: len(prompt)] == prompt else 0  # implicit form that also carries the prompt
        return _completion_must_start_with_assistant(prompt, chosen[offset:], "chosen", offset)
    n = common_prefix_len(chosen, rejected)
    if n == len(chosen):  # identical pair (or chosen is a prefix of rejected)
        last = max((k for k, m in enumerate(chosen) if m["role"] == "assistant"), default=None)
        if last is None:
            raise RecordError("no_assistant", "chosen: no assistant message; fix: add the assistant's answer")
        n = last
    return _completion_must_start_with_assistant(chosen[:n], chosen[n:], "chosen", n)


def split_record(record: Mapping) -> Example:
    """Detect the record's format and split it into prompt and completion (see module doc), with its tools and its
    own template variables (`chat_template_kwargs`: a record of mixed thinking/non-thinking data sets them per
    record, merged over `data.chat_template_kwargs`, as TRL's SFTTrainer does)."""
    example = _split(record)
    tools, kwargs = tools_from(record), template_kwargs_from(record)
    if example.kind != "chat" or (tools is None and kwargs is None):
        return example
    return dataclasses.replace(example, tools=tools, template_kwargs=kwargs)


def template_kwargs_from(record: Mapping) -> Optional[dict]:
    """The record's `chat_template_kwargs`: template variable names to values; None when absent or empty.

    >>> template_kwargs_from({"chat_template_kwargs": {"enable_thinking": False}})
    {'enable_thinking': False}
    """
    kwargs = record.get("chat_template_kwargs")
    if kwargs is None or kwargs == {}:
        return None
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise RecordError("bad_template_kwargs", f"chat_template_kwargs: must map template variable names to "
                                                 f"values (got {shorten(kwargs)}); fix: e.g. "
                                                 '{"enable_thinking": false}')
    return dict(kwargs)


def split_alpaca(record: Mapping) -> Example:
    """Alpaca: the instruction (and the input after a blank line) as the user turn, the output as the answer.

    >>> split_alpaca({"instruction": "Sum", "input": "2, 2", "output": "4"}).prompt
    [{'role': 'user', 'content': 'Sum\\n\\n2, 2'}]
    """
    for key in ("instruction", "output"):
        if key not in record:
            raise RecordError("missing_field", f"Alpaca record has no {key!r}; fix: give 'instruction' and 'output' "
                                               "(and optionally 'input', 'system')")
    for key in ("instruction", "input", "output", "system"):
        if key in record and not isinstance(record[key], str):
            raise RecordError("bad_type", f"{key}: must be a string (got {shorten(record[key])})")
    if not record["output"]:
        raise RecordError("no_completion", "output: empty; fix: give the answer to train on")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    prompt = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
        {"role": "user", "content": user}]
    return Example("chat", prompt, [{"role": "assistant", "content": record["output"]}])


def _rename_message(msg: Any, keys: Mapping, roles: Mapping) -> Any:
    if not isinstance(msg, Mapping):
        return msg
    out = {keys.get(k, k): v for k, v in msg.items()}
    role = out.get("role")
    if isinstance(role, str) and role in roles:
        out["role"] = roles[role]
    return out


def rename(record: Mapping, columns: Mapping[str, str]) -> Mapping:
    """`data.columns` applied: the dataset's names (values) become raysft's (keys), for record fields, message keys
    and role values alike.

    >>> rename({"conversation": [{"speaker": "human", "text": "hi"}]},
    ...        {"messages": "conversation", "role": "speaker", "content": "text", "user": "human"})
    {'messages': [{'role': 'user', 'content': 'hi'}]}
    """
    if not columns:
        return record
    fields = {theirs: ours for ours, theirs in columns.items() if ours in RECORD_FIELDS}
    keys = {theirs: ours for ours, theirs in columns.items() if ours in MESSAGE_FIELDS}
    roles = {theirs: ours for ours, theirs in columns.items() if ours in ROLE_VALUES}
    out = {fields.get(k, k): v for k, v in record.items()}
    if keys or roles:
        for field in ("messages", "conversations", "chosen", "rejected", "prompt", "completion"):
            if isinstance(out.get(field), list):
                out[field] = [_rename_message(m, keys, roles) for m in out[field]]
    return out


def split_sharegpt_preference(record: Mapping) -> Example:
    """ShareGPT preference pairs (LLaMA-Factory's `ranking` format): `conversations` is the prompt, `chosen` and
    `rejected` each a single message object (or a list) after it; the completion is `chosen`, `rejected` is
    validated and dropped.

    >>> split_sharegpt_preference({"conversations": [{"from": "human", "value": "2+2?"}],
    ...     "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}).completion
    [{'role': 'assistant', 'content': '4'}]
    """
    field = "conversations" if "conversations" in record else "messages"
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError("missing_field", f"preference record has {field!r} but no {key!r}; fix: add {key!r} "
                                               "(a message object), or drop the other one")
    prompt = messages_from(record[field], field, sharegpt=field == "conversations")
    turns = {}
    for key in ("chosen", "rejected"):
        value = [record[key]] if isinstance(record[key], Mapping) else record[key]
        keyed = isinstance(value, list) and value and isinstance(value[0], Mapping) and "from" in value[0]
        turns[key] = messages_from(value, key, sharegpt=bool(keyed))
    return _completion_must_start_with_assistant(prompt, turns["chosen"], "chosen")


def _split(record: Mapping) -> Example:
    if ("chosen" in record or "rejected" in record) and ("conversations" in record or (
            "messages" in record and isinstance(record.get("chosen"), Mapping))):
        return split_sharegpt_preference(record)
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
    if "instruction" in record or "output" in record:
        return split_alpaca(record)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise RecordError("bad_type", f"text: must be a non-empty string (got {shorten(record['text'])})")
        return Example("text", "", record["text"])
    keys = ", ".join(map(repr, list(record)[:8])) or "none"
    raise RecordError("unknown_format", f"no known fields (got keys {keys}); fix: {FORMATS_HINT}")
