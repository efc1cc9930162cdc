r"""Messages -> ChatML text, as segments that say which characters are control tokens and which are trained.

The only place that knows `<|im_start|>` / `<|im_end|>`. Each message renders as
``<|im_start|>{role}\n{body}<|im_end|>\n``. The prompt is the rendered prompt messages followed by
``<|im_start|>assistant\n``; the completion is the first completion message's body followed by
``<|im_end|>\n``, then any further completion messages rendered in full. Trained (with
``loss_on: completion``): the body and closing ``<|im_end|>`` of every assistant message of the
completion, never a user, system or tool turn, never the newline after ``<|im_end|>``.

Tools, tool calls and reasoning follow the Hermes/Qwen2.5 convention:

- a record's ``tools`` become a ``# Tools`` block at the end of the system message (a system message of its
  own when the record has none), each schema one JSON line inside ``<tools></tools>``;
- an assistant body is ``<think>\n{reasoning}\n</think>\n\n`` (when it has reasoning, even empty), then its
  content, then each tool call as ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, joined by newlines;
  the think block is trained unless ``train_on_reasoning`` is false;
- a tool result is a ``tool`` turn, ``<|im_start|>tool\n{content}<|im_end|>\n``, never trained.

`CHAT_TEMPLATE` is the same rendering in Jinja, written into exported tokenizers (tested equal).
Control tokens are their own segments, so the tokenizer turns only them into control ids: a
``<|im_start|>`` typed inside content stays text. This module imports neither ray nor torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

from raysft.data.records import Example, RecordError, split_record

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS = (IM_START, IM_END)
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

# The Jinja chat template written into exported tokenizers; renders exactly as this module does.
CHAT_TEMPLATE = (
    "{%- set rest = messages -%}"
    "{%- if tools -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set head = messages[0]['content'] + '\\n\\n' -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set head = '' -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + head + " + json.dumps(TOOLS_HEAD) + " -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- " + json.dumps(TOOLS_TAIL) + " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if message.get('reasoning_content') is not none -%}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- message.get('content') or '' -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- if not loop.first or message.get('content') -%}{{- '\\n' -}}{%- endif -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' + args + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class Segment(NamedTuple):  # a tuple: made for every part of every message, so it must be cheap
    text: str
    control: bool = False  # one control token, never split
    trained: bool = False  # loss is taken on these tokens (loss_on: completion)
    off: bool = False  # a turn the record switched off (weight: 0, train: false): untrained under loss_on: all too


@dataclass(frozen=True)
class Rendered:
    prompt: str
    completion: str
    segments: tuple[Segment, ...]
    chat: bool = True  # a conversation (its mask is checked), not a `text` record
    rules: tuple[str, ...] = ()  # how a model's own template was read (template.RULES), for the preflight's report
    history_untrained: int = 0  # assistant turns left untrained: the template renders them differently in history

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def tool_call_text(call: Mapping) -> str:
    r"""One tool call as the assistant writes it.

    >>> tool_call_text({"type": "function", "function": {"name": "f", "arguments": {"x": 1}}})
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    """
    fn = call["function"]
    return f"<tool_call>\n{json.dumps({'name': fn['name'], 'arguments': fn['arguments']}, ensure_ascii=False)}\n" \
           "</tool_call>"


def think_text(reasoning: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n"


def answer_text(message: Mapping) -> str:
    """An assistant message's content and tool calls (not its reasoning), as rendered."""
    parts = [message["content"]] if message["content"] else []
    return "\n".join(parts + [tool_call_text(c) for c in message.get("tool_calls", ())])


def empty_answer(where: str = "") -> RecordError:
    return RecordError("empty_answer", "an assistant turn has only reasoning, and data.train_on_reasoning is false: "
                                       "nothing but the end of the turn would be trained; fix: give the answer, "
                                       "or set data.train_on_reasoning: true", where)


def _body(m: Mapping, trained: bool, train_on_reasoning: bool) -> list[Segment]:
    if m["role"] != "assistant":
        return [Segment(m["content"], trained=trained)]
    out = [Segment(think_text(m["reasoning_content"]), trained=trained and train_on_reasoning)] \
        if m.get("reasoning_content") is not None else []
    answer = answer_text(m)
    if trained and not train_on_reasoning and not answer:
        raise empty_answer()
    return out + [Segment(answer, trained=trained)]


_START, _NEWLINE = Segment(IM_START, True), Segment("\n")
_END = {True: Segment(IM_END, True, True), False: Segment(IM_END, True, False)}
_HEADS: dict = {}  # role -> its "{role}\n" segment


def _message(m: Mapping, trained: bool, train_on_reasoning: bool = True) -> list[Segment]:
    role = m["role"]
    head = _HEADS.get(role) or _HEADS.setdefault(role, Segment(f"{role}\n"))
    return [_START, head, *_body(m, trained, train_on_reasoning), _END[trained], _NEWLINE]


def _text(segments) -> str:
    return "".join(s.text for s in segments)


def with_system(messages: list, system_message: Optional[str], tools: Optional[list] = None) -> list:
    """The prompt messages with the configured system message put first when they have none, and the tools block."""
    messages = list(messages)
    if system_message and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_message})
    if tools:
        block = TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_TAIL
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + block}
        else:
            messages.insert(0, {"role": "system", "content": block})
    return messages


def render_messages(messages: list[Mapping]) -> str:
    r"""Messages in ChatML.

    >>> render_messages([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\nHi<|im_end|>\n'
    """
    return "".join(_text(_message(m, trained=False)) for m in messages)


def split_control(text: str, trained: bool) -> list[Segment]:
    """Already-rendered text with its literal control tokens made control segments (for `text` records)."""
    parts = re.split(f"({re.escape(IM_START)}|{re.escape(IM_END)})", text)
    return [Segment(p, control=p in CONTROL_TOKENS, trained=trained) for p in parts if p]


def render_example(example: Example, system_message: Optional[str] = None, train_on_reasoning: bool = True) -> Rendered:
    r"""An `Example` as ChatML (chat) or plain concatenation (text), with its segments.

    >>> r = render_example(Example("chat", [{"role": "user", "content": "2+2?"}],
    ...                            [{"role": "assistant", "content": "4"}]))
    >>> r.prompt, r.completion
    ('<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n', '4<|im_end|>\n')
    >>> [s.text for s in r.segments if s.trained]
    ['4', '<|im_end|>']
    """
    if example.kind == "text":
        segments = split_control(example.prompt, False) + split_control(example.completion, True)
        return Rendered(example.prompt, example.completion, tuple(segments), chat=False)
    segments: list[Segment] = []
    for m in with_system(example.prompt, system_message, example.tools):
        segments += _message(m, trained=False)
    head = len(segments) + 2  # the answer starts after the first completion message's <|im_start|>assistant\n
    for m in example.completion:
        if m.get("switched_off"):  # untrained context, whatever data.loss_on says
            segments += [s._replace(off=True) for s in _message(m, trained=False)]
        else:
            segments += _message(m, trained=m["role"] == "assistant", train_on_reasoning=train_on_reasoning)
    prompt = _text(segments[:head])
    return Rendered(prompt, _text(segments[head:]), tuple(segments))


def render_prompt(messages: list[Mapping], system_message: Optional[str] = None,
                  tools: Optional[list] = None) -> Rendered:
    r"""A conversation so far, ending with the assistant header: what a model is asked to continue.

    >>> render_prompt([{"role": "user", "content": "Hi"}]).text
    '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    """
    segments: list[Segment] = []
    for m in with_system(messages, system_message, tools):
        segments += _message(m, trained=False)
    segments += [Segment(IM_START, control=True), Segment("assistant\n")]
    return Rendered(_text(segments), "", tuple(segments))


def to_chatml(record: Mapping, system_message: Optional[str] = None, train_on_reasoning: bool = True) -> dict:
    """A record (any supported format) -> ``{"prompt", "completion", "text"}``; raises RecordError.

    >>> out = to_chatml({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    >>> out["text"]
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n'
    >>> out["text"] == out["prompt"] + out["completion"]
    True
    """
    rendered = render_example(split_record(record), system_message, train_on_reasoning)
    return {"prompt": rendered.prompt, "completion": rendered.completion, "text": rendered.text}
