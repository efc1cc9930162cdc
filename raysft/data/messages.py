"""One message (or a list of them) of an input record, validated: roles (and ShareGPT's), content (text parts
joined), tool calls in OpenAI form with their arguments parsed, the record's tools, and reasoning (a
`reasoning_content` field, or a `<think>...</think>` block opening an assistant's content). Anything malformed
raises `RecordError` with a reason code and a message that names the field. This module imports neither ray nor
torch.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from raysft.data.parsing import RecordError, loads, shorten

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool",
                  "function_call": "function_call"}  # LLaMA-Factory's: an assistant's call as JSON text
MESSAGE_FIELDS = ("role", "content", "tool_calls", "reasoning_content", "tool_call_id", "name")
ROLE_VALUES = ("system", "user", "assistant", "tool")


Message = dict  # {"role": str, "content": str} + tool_calls / reasoning_content / tool_call_id / name
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_FORM = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'


TEXT_PARTS = ("text", "input_text", "output_text")  # OpenAI's chat and Responses part types
REASONING_PARTS = ("reasoning", "thinking")  # LLaMA-Factory v1's messages format, Anthropic's thinking blocks
CALL_PARTS = ("tool_call", "function_call")  # LLaMA-Factory v1: {"type": "tool_call", "value": "{\"name\": ...}"}
RESULT_PARTS = ("observation", "tool_result")  # LLaMA-Factory v1, on a tool message


def _part_text(part: Mapping, keys: tuple) -> Optional[str]:
    return next((part[k] for k in keys if isinstance(part.get(k), str)), None)


def _parts(value: list, field: str, role: str) -> tuple[str, Optional[str], list]:
    """Content given as a list of parts -> (text, reasoning or None, tool calls): text parts (`text` or `value`)
    joined; reasoning or thinking parts (an assistant's) its reasoning; tool-call parts (an assistant's, a JSON
    `{"name", "arguments"}` value) its calls; a tool's result parts its text. Any other part (an image, audio) is a
    bad message naming it: raysft trains text."""
    texts, reasoning, calls = [], [], []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        at = f"{field}[{i}]"
        if kind in TEXT_PARTS or (kind in RESULT_PARTS and role == "tool"):
            text = _part_text(part, ("text", "value", "content"))
            if text is None:
                raise RecordError("bad_message", f"{at}: a {kind} part needs a string text or value (got "
                                                 f"{shorten(part)})")
            texts.append(text)
        elif kind in REASONING_PARTS and role == "assistant":
            text = _part_text(part, (kind, "text", "value"))
            if text is None:
                raise RecordError("bad_message", f"{at}: a {kind} part needs a string {kind}, text or value (got "
                                                 f"{shorten(part)})")
            reasoning.append(text)
        elif kind in CALL_PARTS and role == "assistant":
            calls += tool_calls_from(_call_value(part.get("value", part.get("function")), at), at)
        else:
            raise RecordError("bad_message", f"{at}: a {kind or 'untyped'} part in a {role} message (got "
                                             f"{shorten(part)}); raysft trains text: text, reasoning or tool-call "
                                             "parts of an assistant, text of the others; fix: drop the part, or skip "
                                             "such records (data.on_bad_record: skip)")
    return "".join(texts), "\n\n".join(reasoning) if reasoning else None, calls


def _call_value(value: Any, where: str) -> list:
    """A tool call written as JSON text (or an object, or a list of them) -> a list of calls to validate."""
    if isinstance(value, str):
        try:
            value = loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RecordError("bad_tool_call", f"{where}: a tool call that is not valid JSON (got {shorten(value)}); "
                                               'fix: {"name": "get_weather", "arguments": {"city": "Paris"}}') from None
    return value if isinstance(value, list) else [value]


def _content(value: Any, field: str, role: str = "user") -> tuple[str, Optional[str], list]:
    """A message's content -> (text, reasoning from parts, tool calls from parts)."""
    if isinstance(value, str):
        return value, None, []
    if isinstance(value, list):
        return _parts(value, field, role)
    raise RecordError("bad_message", f"{field}: content must be a string or a list of parts (got {shorten(value)}); "
                                     "fix: give each message a string content")


def _arguments(value: Any, where: str) -> dict:
    """A tool call's `arguments`: a JSON object, or a string holding one."""
    if isinstance(value, str):
        try:
            value = loads(value) if value.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise RecordError("bad_tool_call", f"{where}: arguments are not valid JSON (got {shorten(value)}); "
                                               "fix: give arguments as a JSON object or a string holding one") from None
    if not isinstance(value, dict):
        raise RecordError("bad_tool_call", f"{where}: arguments must be a JSON object (got {shorten(value)}); "
                                           'fix: {"arguments": {"city": "Paris"}}')
    return value


def tool_calls_from(value: Any, where: str) -> list[dict]:
    """Validated tool calls in OpenAI form, `arguments` as an object (the flat {"name", "arguments"} form too).

    >>> tool_calls_from([{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}], "m")
    [{'type': 'function', 'function': {'name': 'f', 'arguments': {'x': 1}}}]
    """
    if not isinstance(value, list) or not value:
        raise RecordError("bad_tool_call", f"{where}: must be a non-empty list (got {shorten(value)}); "
                                           f"fix: [{CALL_FORM}]")
    out = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError("bad_tool_call", f"{at}: a tool call needs a function name (got {shorten(call)}); "
                                               f"fix: {CALL_FORM}")
        norm = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(
            fn.get("arguments", {}), f"{at}.function.arguments")}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]
        out.append(norm)
    return out


def tools_from(record: Mapping) -> Optional[list]:
    """The record's `tools` (JSON schemas), validated as a list of objects; None when absent or empty."""
    tools = record.get("tools")
    if isinstance(tools, str):  # many datasets keep the schemas as a JSON string
        try:
            tools = loads(tools) if tools.strip() else None
        except (json.JSONDecodeError, RecursionError):
            raise RecordError("bad_tools", f"tools: a string that is not valid JSON (got {shorten(tools)}); fix: give "
                                           "tools as a list of JSON schema objects, or a string holding one") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) and isinstance(t.get("function", {}), Mapping)
                                              for t in tools):
        raise RecordError("bad_tools", f"tools: must be a list of JSON schema objects (got {shorten(tools)}); "
                                       'fix: [{"type": "function", "function": {"name": ..., "parameters": {...}}}]')
    return [dict(t) for t in tools]


def _split_think(content: str) -> tuple[Optional[str], str]:
    """A `<think>...</think>` block opening the content -> (reasoning, answer); (None, content) without one."""
    head = content.lstrip()
    end = head.find(THINK_CLOSE)
    if not head.startswith(THINK_OPEN) or end < 0:
        return None, content
    return head[len(THINK_OPEN): end].strip(), head[end + len(THINK_CLOSE):].lstrip()


def _assistant_fields(msg: Mapping, out: dict, where: str, content_key: str) -> None:
    if msg.get("tool_calls"):  # null or [] (OpenAI exports put it on every message): no calls
        out["tool_calls"] = tool_calls_from(msg["tool_calls"], f"{where}.tool_calls")
    reasoning = msg.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise RecordError("bad_message", f"{where}.reasoning_content: must be a string (got {shorten(reasoning)})")
    else:
        reasoning, out["content"] = _split_think(out["content"])
    if reasoning is not None:
        out["reasoning_content"] = reasoning.strip()


# per-message training flags on assistant turns: OpenAI's fine-tuning format (`weight: 0 | 1`), `train: true |
# false`, `loss_weight: 0.0 | 1.0`; a turn one of them switches off stays in the row as untrained context
TRAIN_FLAGS = ("weight", "train", "loss_weight")


def switched_off(msg: Mapping, where: str) -> Optional[str]:
    """The flag that switches this assistant turn off (untrained context), or None; a weight other than 0 or 1 (or
    a `train` that is not a boolean) is a bad record: raysft trains a turn or not, it has no weighted loss.

    >>> switched_off({"role": "assistant", "content": "hi", "weight": 0}, "messages[1]")
    'weight'
    """
    off = None
    for flag in TRAIN_FLAGS:
        if flag not in msg or msg[flag] is None:
            continue
        value = msg[flag]
        if flag == "train":
            if not isinstance(value, bool):
                raise RecordError("bad_weight", f"{where}.train: must be true or false (got {shorten(value)}); fix: "
                                                "train: false for a turn to keep as untrained context")
            on = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
            raise RecordError("bad_weight", f"{where}.{flag}: {shorten(value)}, and a turn is trained or not (a "
                                            "weighted loss is not offered); fix: 0 (untrained context) or 1 "
                                            "(trained)")
        else:
            on = value == 1
        off = off or (None if on else flag)
    return off


def _one_message(msg: Any, where: str, role_key: str, content_key: str, roles: Mapping) -> Message:
    if type(msg) is dict and len(msg) == 2:  # the common case, quickly: a role and a string content
        role, content = msg.get(role_key), msg.get(content_key)
        if type(role) is str and type(content) is str and role in roles and roles[role] != "function_call" and not (
                roles[role] == "assistant" and THINK_OPEN in content):
            return {"role": roles[role], "content": content}
    if not isinstance(msg, Mapping):
        raise RecordError("bad_message", f"{where}: a message must be an object (got {shorten(msg)})")
    if role_key not in msg:
        raise RecordError("bad_message", f"{where}: message has no {role_key!r} (got {shorten(msg)}); "
                                         f"fix: every message needs {role_key!r} and {content_key!r}")
    role = msg[role_key]
    if role not in roles:
        raise RecordError("unknown_role", f"{where}: unknown role {role!r}; fix: use one of {', '.join(roles)}")
    role = roles[role]
    if role == "function_call":  # the call is the turn: {"name", "arguments"} (or a list) as JSON text
        return {"role": "assistant", "content": "", "tool_calls": tool_calls_from(
            _call_value(msg.get(content_key), f"{where}.{content_key}"), f"{where}.{content_key}")}
    calls = role == "assistant" and bool(msg.get("tool_calls"))
    if msg.get(content_key) is None and not calls:
        missing = "no" if content_key not in msg else "a null"
        raise RecordError("bad_message", f"{where}: message has {missing} {content_key!r} (got {shorten(msg)}); "
                                         f"fix: every message needs {role_key!r} and {content_key!r}"
                                         + (" (null is allowed only beside tool_calls)" if role == "assistant" else ""))
    text, reasoning, part_calls = ("", None, []) if msg.get(content_key) is None else _content(
        msg[content_key], f"{where}.{content_key}", role)
    out = {"role": role, "content": text}
    if role == "assistant":
        _assistant_fields(msg, out, where, content_key)
        flag = switched_off(msg, where)
        if flag:
            out["switched_off"] = flag  # raysft's own key: rendered as context, never passed to a template
        if reasoning is not None:
            if "reasoning_content" in out:
                raise RecordError("bad_message", f"{where}: reasoning given twice (a reasoning part and "
                                                 "reasoning_content or a <think> block); fix: keep one")
            out["reasoning_content"] = reasoning.strip()
        if part_calls:
            out["tool_calls"] = out.get("tool_calls", []) + part_calls
    elif role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(msg.get(key), str):
                out[key] = msg[key]
    return out


def with_call_ids(messages: list[Message]) -> list[Message]:
    """Tool calls without an id get one, deterministic (`call00000`, `call00001`, ... in the record's order: nine
    letters and digits, the form Mistral's templates require), and a tool message without `tool_call_id` (or
    `name`) answers the earliest call not yet answered.

    >>> out = with_call_ids([{"role": "assistant", "content": "", "tool_calls": [
    ...     {"type": "function", "function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "1"}])
    >>> out[0]["tool_calls"][0]["id"], out[1]
    ('call00000', {'role': 'tool', 'content': '1', 'tool_call_id': 'call00000', 'name': 'f'})
    """
    if not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages
    pending, n, out = [], 0, []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                if "id" not in call:
                    call = {**call, "id": f"call{n:05d}"}
                n += 1
                calls.append(call)
                pending.append(call)
            m = {**m, "tool_calls": calls}
        elif m["role"] == "tool":
            answered = next((c for c in pending if c["id"] == m.get("tool_call_id")), pending[0] if pending else None)
            if answered is not None:
                pending.remove(answered)
                m = {**m, "tool_call_id": m.get("tool_call_id", answered["id"]),
                     "name": m.get("name", answered["function"]["name"])}
        out.append(m)
    return out


def messages_from(value: Any, field: str, sharegpt: bool = False) -> list[Message]:
    """Validated list of {"role", "content", ...} from a record field (ShareGPT `from`/`value` mapped).

    >>> messages_from([{"from": "human", "value": "hi"}], "conversations", sharegpt=True)
    [{'role': 'user', 'content': 'hi'}]
    """
    if not isinstance(value, list):
        raise RecordError("bad_type", f"{field}: must be a list of messages (got {shorten(value)}); "
                                      'fix: [{"role": "user", "content": "..."}, ...]')
    if not value:
        raise RecordError("empty_conversation", f"{field}: empty conversation; fix: give at least one "
                                                "user and one assistant message")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    return with_call_ids([_one_message(msg, f"{field}[{i}]", role_key, content_key, roles)
                          for i, msg in enumerate(value)])
