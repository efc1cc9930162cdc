"""Messages -> segments through the tokenizer's own Jinja chat template (`data.chat_template: model | PATH`).

transformers renders the template; raysft never re-implements a model's format. The loss mask comes from
rendering prefixes of the conversation, never from searching the text for headers:

    P_j = render(messages[:j], add_generation_prompt=True)   # what the model is given before assistant turn j
    F_j = render(messages[:j + 1])                           # ... and after that turn

The trained part of assistant turn j is ``F_j[len(P_j):]`` (its content, tool calls, and the template's end-of-turn
token), less the whitespace after that token; everything between turns is untrained. Each render must extend the
one before (``P_j`` a prefix of ``F_j``, ``F_j`` of ``P_{j+1}``, ...): a template that renders history differently
from the last turn is refused (`template_not_prefix_stable`) rather than trained on text the model never sees.

Control-token syntax typed in user strings (content, tools, tool arguments) stays text: it is wrapped in two
private-use markers before rendering, so the control tokens of the rendered text are exactly those the template
wrote (what `apply_chat_template(..., sanitize_control_tokens=True)` does). Each turn is checked: its content, its
reasoning and its tool calls must appear in what the template rendered for it (a template that drops them is an
error, not a silent loss), and the turn must end with a control token (the end-of-turn token a model learns to stop
at). This module imports neither ray nor torch.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import Mapping, Optional, Sequence

from raysft.data.chatml import Rendered, Segment, answer_text, empty_answer, think_text, with_system
from raysft.data.parsing import shorten
from raysft.data.records import THINK_CLOSE, Example, RecordError

MARK_START, MARK_END = "\ue000", "\ue001"  # private-use characters: never in a template, stripped from user strings
_patterns: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (template, find, split)
_end_of_turn: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> ((template, size), token)


def control_tokens(tokenizer, template: str) -> tuple[str, ...]:
    """The tokens a template writes as control tokens: the tokenizer's special tokens, plus its other added tokens
    that the template's text contains (whitespace tokens excepted), longest first."""
    template = template or ""
    found = {t.content for t in tokenizer.added_tokens_decoder.values()
             if t.content and (t.special or (t.content in template and not t.content.isspace()))}
    return tuple(sorted(found, key=len, reverse=True))


def _compiled(tokenizer) -> tuple[re.Pattern, re.Pattern]:
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


def render(tokenizer, messages: list, tools: Optional[list], generation: bool) -> str:
    """The template's text for `messages` (markers kept); a template error is a RecordError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False)
    except Exception as exc:  # jinja2 errors and the template's own raise_exception
        raise RecordError("template_error", f"the chat template failed on this record ({type(exc).__name__}: "
                                            f"{shorten(str(exc), 160)}); fix: make the record fit the template "
                                            "(e.g. alternate user and assistant turns), or use another "
                                            "data.chat_template") from None


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # what templates call it (Qwen3, gpt-oss, ...)


def reasoning_field(template: Optional[str]) -> Optional[str]:
    """The message field a template reads reasoning from, or None (then it goes inline, as a think block).

    >>> reasoning_field("{{ message.thinking }}"), reasoning_field("{{ m['content'] }}")
    ('thinking', None)
    """
    for name in REASONING_FIELDS:
        if re.search(rf"(\.{name}\b|\[\s*['\"]{name}['\"]\s*\])", template or ""):
            return name
    return None


def _native(message: Mapping, field: Optional[str]) -> dict:
    """A message as templates take it: reasoning in the field the template reads, else as a think block opening
    the content."""
    out = dict(message)
    reasoning = out.pop("reasoning_content", None)
    if reasoning is not None:
        if field:
            out[field] = reasoning
        else:
            out["content"] = think_text(reasoning) + out["content"]
    return out


def conversation(example: Example, tokenizer, system_message: Optional[str] = None) -> tuple[list, int]:
    """The example's messages as `apply_chat_template` takes them at inference, and where the completion starts."""
    field = reasoning_field(tokenizer.chat_template)
    prompt = with_system(example.prompt, system_message)
    return [_native(m, field) for m in prompt + list(example.completion)], len(prompt)


class _Pieces:
    """Renders of growing prefixes of one conversation, each checked to extend the one before."""

    def __init__(self, split: re.Pattern):
        self.split = split
        self.text = ""
        self.segments: list[Segment] = []
        self.closed_by = None  # the last trained segment of the last trained piece

    def advance(self, text: str, trained: bool, what: str) -> str:
        if not text.startswith(self.text):
            at = next((i for i, (a, b) in enumerate(zip(text, self.text)) if a != b), min(len(text), len(self.text)))
            raise RecordError("template_not_prefix_stable", (
                f"the chat template is not prefix-stable for this record: rendering {what} does not extend the "
                f"render before it (they differ at character {at}: {shorten(plain(text[at:at + 40]))} vs "
                f"{shorten(plain(self.text[at:at + 40]))}), so the model would train on text it never sees at "
                "inference; fix: use a template that renders earlier turns as it renders the last one, or "
                "data.chat_template: chatml"))
        piece = text[len(self.text):]
        self.text = text
        if not trained:
            self.segments += segments(piece, False, self.split)
            return piece
        body = piece.rstrip()
        trained_segments = segments(body, True, self.split)
        self.closed_by = trained_segments[-1] if trained_segments else None
        self.segments += trained_segments + segments(piece[len(body):], False, self.split)
        return body


def _check_turn(turn: str, message: Mapping, j: int) -> None:
    """The template rendered this assistant turn's content, reasoning and tool calls, and closed it with a token."""
    shown = plain(turn)
    lost = []
    if message["content"].strip() and plain(message["content"]).strip() not in shown:
        lost.append("its content")
    if message.get("reasoning_content") and plain(message["reasoning_content"]).strip() not in shown:
        lost.append("its reasoning")
    for call in message.get("tool_calls", ()):
        if plain(call["function"]["name"]) not in shown:
            lost.append(f"tool call {call['function']['name']!r}")
    if lost:
        raise RecordError("template_drops_content", f"messages[{j}]: the chat template does not render "
                                                    f"{', '.join(lost)} of this assistant turn (rendered: "
                                                    f"{shorten(shown, 120)}); fix: use a template that renders it "
                                                    "(tool calls need a template with tool support), or "
                                                    "data.chat_template: chatml")


def _reasoning_end(common: str, full: str, start: int) -> Optional[int]:
    """Where the reasoning ends in `full`, from the text it shares with the render without the answer: after the
    last `</think>` and the whitespace after it; None without one (never a cut inside a token of the answer)."""
    close = common.rfind(THINK_CLOSE, start)
    if close < 0:
        return None
    end = close + len(THINK_CLOSE)
    return end + len(full[end:]) - len(full[end:].lstrip())


def end_of_turn_error(turn: str, j: int) -> RecordError:
    return RecordError("no_end_of_turn", f"messages[{j}]: the chat template ends this assistant turn without a "
                                         f"control token (it ends with {shorten(plain(turn)[-30:])}), so the model "
                                         "would never learn to stop; fix: add the template's end-of-turn token to the "
                                         "tokenizer as a special token, or use data.chat_template: chatml")


def render_native(example: Example, tokenizer, system_message: Optional[str] = None,
                  train_on_reasoning: bool = True) -> Rendered:
    """An `Example` through the tokenizer's chat template, its segments marked trained by rendering prefixes."""
    find, split = _compiled(tokenizer)
    if example.kind == "text":
        segs = segments(example.prompt, False, split) + segments(example.completion, True, split)
        return Rendered(example.prompt, example.completion, tuple(segs), chat=False)
    field = reasoning_field(tokenizer.chat_template)
    native, start = conversation(example, tokenizer, system_message)
    prompt = native[:start]
    messages = mark(native, find)
    tools = mark(example.tools, find) if example.tools else None
    pieces = _Pieces(split)
    head = None
    for j in range(len(prompt), len(messages)):
        message = example.completion[j - len(prompt)]
        if message["role"] != "assistant":
            continue
        pieces.advance(render(tokenizer, messages[:j], tools, True), False, f"messages[:{j}] with the generation "
                                                                              "prompt")
        head = pieces.text if head is None else head
        turn = ""
        if message.get("reasoning_content") is not None and not train_on_reasoning:
            if not answer_text(message):
                raise empty_answer()
            bare = {k: v for k, v in messages[j].items() if k != "tool_calls"}
            bare["content"] = "" if field else mark(think_text(message["reasoning_content"]), find)
            full = render(tokenizer, messages[:j + 1], tools, False)
            common = os.path.commonprefix([render(tokenizer, messages[:j] + [bare], tools, False), full])
            end = _reasoning_end(common, full, len(pieces.text))
            if end is None or plain(message["reasoning_content"]).strip() not in plain(full[len(pieces.text):end]):
                raise RecordError("reasoning_not_separable", (
                    f"messages[{j}]: the reasoning cannot be told apart from the answer in what the chat template "
                    "renders (no </think> after it), so it cannot be masked; fix: set data.train_on_reasoning: true, "
                    "or use data.chat_template: chatml"))
            turn = pieces.advance(full[:end], False, "the reasoning")
        turn += pieces.advance(render(tokenizer, messages[:j + 1], tools, False), True, f"messages[:{j + 1}]")
        _check_turn(turn, message, j)
        if not (pieces.closed_by and pieces.closed_by.control):
            raise end_of_turn_error(turn, j)
    pieces.advance(render(tokenizer, messages, tools, False), False, "the whole conversation")
    if tools and not all(plain(str(t.get("function", t).get("name", ""))) in plain(head or "") for t in tools):
        raise RecordError("template_drops_content", "the chat template does not render the record's tools in the "
                                                    "prompt; fix: use a template with tool support, or "
                                                    "data.chat_template: chatml")
    text = plain(pieces.text)
    cut = len(plain(head or ""))
    return Rendered(text[:cut], text[cut:], tuple(pieces.segments))


def render_prompt(messages: Sequence[Mapping], tokenizer, system_message: Optional[str] = None,
                  tools: Optional[list] = None) -> Rendered:
    """A conversation so far with the generation prompt: what a model is asked to continue (`raysft generate`)."""
    find, split = _compiled(tokenizer)
    native, _ = conversation(Example("chat", list(messages), []), tokenizer, system_message)
    text = render(tokenizer, mark(native, find), mark(tools, find) if tools else None, True)
    return Rendered(plain(text), "", tuple(segments(text, False, split)))


def end_of_turn(tokenizer) -> Optional[str]:
    """The control token the tokenizer's template closes an assistant turn with (None when it closes with none).

    Found by rendering a two-message probe conversation, as training does; once per tokenizer and template."""
    cached = _end_of_turn.get(tokenizer)
    key = (tokenizer.chat_template, len(tokenizer))
    if cached is not None and cached[0] == key:
        return cached[1]
    probe = Example("chat", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])
    try:
        rendered = render_native(probe, tokenizer)
    except RecordError:
        rendered = None
    trained = [s for s in rendered.segments if s.trained] if rendered else []
    found = trained[-1].text if trained and trained[-1].control else None
    _end_of_turn[tokenizer] = (key, found)
    return found


def stop_ids(tokenizer, also=()) -> list[int]:
    """The ids generation stops at: the template's end-of-turn token first, then `also` (e.g. the base model's
    generation eos ids), then the tokenizer's eos; each once."""
    eot = end_of_turn(tokenizer)
    out = [tokenizer.convert_tokens_to_ids(eot)] if eot else []
    for token_id in [*also, tokenizer.eos_token_id]:
        if token_id is not None and token_id not in out:
            out.append(token_id)
    return out
