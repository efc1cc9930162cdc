"""A model's own Jinja chat template, called as inference calls it: the messages as templates take them, user
strings' control-token syntax kept as text, rendered text split into control and text segments.

Control-token syntax typed in user strings (content, tools, tool arguments) stays text: it is wrapped in two
private-use markers before rendering, so the control tokens of the rendered text are exactly those the template
wrote (what `apply_chat_template(..., sanitize_control_tokens=True)` does). This module imports neither ray nor
torch.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import Mapping, Optional

from raysft.data.chatml import Segment, think_text, with_system
from raysft.data.parsing import shorten
from raysft.data.records import Example, RecordError

MARK_START, MARK_END = "\ue000", "\ue001"  # private-use characters: never in a template, stripped from user strings
_patterns: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (template, find, split)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # what templates call it (Qwen3, gpt-oss, ...)


def control_tokens(tokenizer, template: str) -> tuple[str, ...]:
    """The tokens a template writes as control tokens: the tokenizer's special tokens, plus its other added tokens
    that the template's text contains (whitespace tokens excepted), longest first."""
    template = template or ""
    found = {t.content for t in tokenizer.added_tokens_decoder.values()
             if t.content and (t.special or (t.content in template and not t.content.isspace()))}
    return tuple(sorted(found, key=len, reverse=True))


def compiled(tokenizer) -> tuple[re.Pattern, re.Pattern]:
    """(find, split): the tokenizer's control tokens, and those or a marked one or a lone marker; cached."""
    template = tokenizer.chat_template
    cached = _patterns.get(tokenizer)
    if cached is None or cached[0] is not template:
        alternatives = "|".join(map(re.escape, control_tokens(tokenizer, template))) or "(?!)"
        split = re.compile(f"{MARK_START}({alternatives}){MARK_END}|({alternatives})|[{MARK_START}{MARK_END}]")
        cached = (template, re.compile(alternatives), split)
        _patterns[tokenizer] = cached
    return cached[1], cached[2]


def mark(value, find: re.Pattern):
    """User strings with their control-token syntax wrapped in markers (dict keys untouched), recursively."""
    if isinstance(value, str):
        value = value.replace(MARK_START, "").replace(MARK_END, "")
        return find.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", value)
    if isinstance(value, Mapping):
        return {k: mark(v, find) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark(v, find) for v in value]
    return value


def segments(text: str, trained: bool, split: re.Pattern) -> list[Segment]:
    """Rendered text -> segments: the template's control tokens are control segments; marked ones are text."""
    out: list[Segment] = []
    pos = 0
    for m in split.finditer(text):
        if m.start() > pos:
            out.append(Segment(text[pos: m.start()], trained=trained))
        if m.group(1):  # control-token syntax from a user string: text
            out.append(Segment(m.group(1), trained=trained))
        elif m.group(2):
            out.append(Segment(m.group(2), control=True, trained=trained))
        pos = m.end()
    if pos < len(text):
        out.append(Segment(text[pos:], trained=trained))
    return out


def plain(text: str) -> str:
    return text.replace(MARK_START, "").replace(MARK_END, "")


def render(tokenizer, messages: list, tools: Optional[list], generation: bool, kwargs: Optional[Mapping] = None) -> str:
    """The template's text for `messages` (markers kept), with the template kwargs; a template error is a
    RecordError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False,
                                             **(kwargs or {}))
    except Exception as exc:  # jinja2 errors and the template's own raise_exception
        raise RecordError("template_error", f"the chat template failed on this record ({type(exc).__name__}: "
                                            f"{shorten(str(exc), 160)}); fix: make the record fit the template "
                                            "(e.g. alternate user and assistant turns), or use another "
                                            "data.chat_template") from None


def reasoning_field(template: Optional[str]) -> Optional[str]:
    """The message field a template reads reasoning from, or None (then it goes inline, as a think block).

    >>> reasoning_field("{{ message.thinking }}"), reasoning_field("{{ m['content'] }}")
    ('thinking', None)
    >>> reasoning_field("{%- set t = message.get('reasoning') or '' %}")
    'reasoning'
    """
    for name in REASONING_FIELDS:
        if re.search(rf"(\.{name}\b|\[\s*['\"]{name}['\"]\s*\]|\.get\(\s*['\"]{name}['\"])", template or ""):
            return name
    return None


def _native(message: Mapping, field: Optional[str]) -> dict:
    """A message as templates take it: reasoning in the field the template reads, else as a think block opening
    the content."""
    out = dict(message)
    out.pop("switched_off", None)  # raysft's own (a training flag): no template reads it
    reasoning = out.pop("reasoning_content", None)
    if reasoning is not None:
        if field:
            out[field] = reasoning
        else:
            out["content"] = think_text(reasoning) + out["content"]
    return out


def conversation(example: Example, tokenizer, system_message: Optional[str] = None,
                 find: Optional[re.Pattern] = None) -> tuple[list, int]:
    """The example's messages as `apply_chat_template` takes them at inference, and where the completion starts;
    with `find`, the user strings marked (before a think block is added: its tags are the template's tokens)."""
    field = reasoning_field(tokenizer.chat_template)
    prompt = with_system(example.prompt, system_message)
    messages = prompt + list(example.completion)
    return [_native(m, field) for m in (mark(messages, find) if find else messages)], len(prompt)


def back_off(text: str, at: int, find: re.Pattern) -> int:
    """`at`, moved back to the start of the control token it falls inside of (never a cut inside a token)."""
    for m in find.finditer(text, max(0, at - 64)):
        if m.start() < at < m.end():
            return m.start()
    return at


def shared(a: str, b: str, find: re.Pattern) -> int:
    """How much of `a` and `b` is the same text: their common prefix, never ending inside a control token."""
    return back_off(a, len(os.path.commonprefix([a, b])), find)
