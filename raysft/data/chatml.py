"""Messages -> ChatML text, as segments that say which characters are control tokens and which are trained.

The only place that knows `<|im_start|>` / `<|im_end|>`. Each message renders as
``<|im_start|>{role}\\n{content}<|im_end|>\\n``. The prompt is the rendered prompt messages followed by
``<|im_start|>assistant\\n``; the completion is the first completion message's content followed by
``<|im_end|>\\n``, then any further completion messages rendered in full. Trained (with
``loss_on: completion``): the content and closing ``<|im_end|>`` of every assistant message of the
completion, never a user, system or tool turn, never the newline after ``<|im_end|>``.

Control tokens are their own segments, so the tokenizer turns only them into control ids: a
``<|im_start|>`` typed inside content stays text. This module imports neither ray nor torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from raysft.data.records import Example, split_record

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS = (IM_START, IM_END)

# The Jinja chat template written into exported tokenizers; renders exactly as this module does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Segment:
    text: str
    control: bool = False  # one ChatML control token, never split
    trained: bool = False  # loss is taken on these tokens (loss_on: completion)


@dataclass(frozen=True)
class Rendered:
    prompt: str
    completion: str
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _message(role: str, content: str, trained: bool) -> list[Segment]:
    return [Segment(IM_START, control=True), Segment(f"{role}\n"), Segment(content, trained=trained),
            Segment(IM_END, control=True, trained=trained), Segment("\n")]


def render_messages(messages: list[Mapping]) -> str:
    """Messages in ChatML.

    >>> render_messages([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n'
    """
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def split_control(text: str, trained: bool) -> list[Segment]:
    """Already-rendered text with its literal control tokens made control segments (for `text` records)."""
    parts = re.split(f"({re.escape(IM_START)}|{re.escape(IM_END)})", text)
    return [Segment(p, control=p in CONTROL_TOKENS, trained=trained) for p in parts if p]


def render_example(example: Example, system_message: Optional[str] = None) -> Rendered:
    """An `Example` as ChatML (chat) or plain concatenation (text), with its segments.

    >>> r = render_example(Example("chat", [{"role": "user", "content": "2+2?"}],
    ...                            [{"role": "assistant", "content": "4"}]))
    >>> r.prompt, r.completion
    ('<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n', '4<|im_end|>\\n')
    >>> [s.text for s in r.segments if s.trained]
    ['4', '<|im_end|>']
    """
    if example.kind == "text":
        segments = split_control(example.prompt, False) + split_control(example.completion, True)
        return Rendered(example.prompt, example.completion, tuple(segments))
    prompt_msgs = list(example.prompt)
    if system_message and not (prompt_msgs and prompt_msgs[0]["role"] == "system"):
        prompt_msgs.insert(0, {"role": "system", "content": system_message})
    segments: list[Segment] = []
    for m in prompt_msgs:
        segments += _message(m["role"], m["content"], trained=False)
    first, *rest = example.completion
    segments += _message("assistant", first["content"], trained=True)
    prompt = render_messages(prompt_msgs) + f"{IM_START}assistant\n"
    for m in rest:
        segments += _message(m["role"], m["content"], trained=m["role"] == "assistant")
    completion = f"{first['content']}{IM_END}\n" + render_messages(rest)
    return Rendered(prompt, completion, tuple(segments))


def render_prompt(messages: list[Mapping], system_message: Optional[str] = None) -> Rendered:
    """A conversation so far, ending with the assistant header: what a model is asked to continue.

    >>> render_prompt([{"role": "user", "content": "Hi"}]).text
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    full = render_example(Example("chat", list(messages), [{"role": "assistant", "content": ""}]), system_message)
    head = full.segments[: len(full.segments) - 3]  # drop the empty answer, its <|im_end|> and newline
    return Rendered(full.prompt, "", tuple(head))


def to_chatml(record: Mapping, system_message: Optional[str] = None) -> dict:
    """A record (any supported format) -> ``{"prompt", "completion", "text"}``; raises RecordError.

    >>> out = to_chatml({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    >>> out["text"]
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n'
    >>> out["text"] == out["prompt"] + out["completion"]
    True
    """
    rendered = render_example(split_record(record), system_message)
    return {"prompt": rendered.prompt, "completion": rendered.completion, "text": rendered.text}
