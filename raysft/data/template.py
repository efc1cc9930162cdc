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
from raysft.data.records import THINK_CLOSE, THINK_OPEN, Example, RecordError

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


def render(tokenizer, messages: list, tools: Optional[list], generation: bool, kwargs: Optional[Mapping] = None) -> str:
    """The template's text for `messages` (markers kept), with `data.chat_template_kwargs`; a template error is a
    RecordError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False,
                                             **(kwargs or {}))
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


def conversation(example: Example, tokenizer, system_message: Optional[str] = None,
                 find: Optional[re.Pattern] = None) -> tuple[list, int]:
    """The example's messages as `apply_chat_template` takes them at inference, and where the completion starts;
    with `find`, the user strings marked (before a think block is added: its tags are the template's tokens)."""
    field = reasoning_field(tokenizer.chat_template)
    prompt = with_system(example.prompt, system_message)
    messages = prompt + list(example.completion)
    return [_native(m, field) for m in (mark(messages, find) if find else messages)], len(prompt)


class _Pieces:
    """Renders of growing prefixes of one conversation, each checked to extend the one before.

    `base` is where the last trained turn starts in the text (what the template renders whatever follows it): a
    later render may re-render what comes after it (history, see RULES) and then continues from there."""

    def __init__(self, split: re.Pattern):
        self.split = split
        self.text = ""
        self.pieces: list[tuple[int, int, bool]] = []  # (start, end, trained) spans of `text`
        self.base = 0
        self.prompt_end: Optional[int] = None  # where the prompt (the first generation prompt) ends
        self.turns: list[int] = []  # where the trained turns start
        self.history_untrained = 0

    def _differs(self, text: str, what: str) -> RecordError:
        at = next((i for i, (a, b) in enumerate(zip(text, self.text)) if a != b), min(len(text), len(self.text)))
        return RecordError("template_not_prefix_stable", (
            f"the chat template is not prefix-stable for this record: rendering {what} does not extend the "
            f"render before it (they differ at character {at}: {shorten(plain(text[at:at + 40]))} vs "
            f"{shorten(plain(self.text[at:at + 40]))}), so the model would train on text it never sees at "
            "inference; fix: use a template that renders earlier turns as it renders the last one, or "
            "data.chat_template: chatml"))

    def advance(self, text: str, trained: bool, what: str, history: bool = False) -> str:
        """Continue with `text`, which must extend what is there; with `history`, it may instead extend the text
        up to `base`: the turns after it become untrained context (returns "history" then)."""
        rewound = ""
        if not text.startswith(self.text):
            if not (history and self.turns and text.startswith(self.text[: self.base])):
                raise self._differs(text, what)
            self._rewind(self.base)
            rewound = "history"
        piece = text[len(self.text):]
        body = piece.rstrip() if trained else piece
        if trained:
            self.turns.append(len(self.text))
        self.pieces.append((len(self.text), len(self.text) + len(body), trained))
        if len(body) < len(piece):
            self.pieces.append((len(self.text) + len(body), len(text), False))
        self.text = text
        return rewound

    def _rewind(self, at: int) -> None:
        self.history_untrained += sum(start >= at for start in self.turns)
        self.turns = [t for t in self.turns if t < at]
        self.pieces = [(a, min(b, at), t) for a, b, t in self.pieces if a < at]
        self.text = self.text[:at]
        self.prompt_end = min(self.prompt_end, at) if self.prompt_end is not None else None

    def last_trained(self) -> str:
        a, b, _ = next(p for p in reversed(self.pieces) if p[2])
        return self.text[a:b]

    def closed_by_control(self) -> bool:
        """The last trained piece ends with a control token (the end-of-turn token a model learns to stop at)."""
        last = segments(self.last_trained(), True, self.split)
        return bool(last) and last[-1].control

    def segments(self) -> list[Segment]:
        return [seg for a, b, trained in self.pieces for seg in segments(self.text[a:b], trained, self.split)]


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


RULES = {  # how a model's template is read, as the preflight reports it (README, "Chat templates")
    "prefix": "each turn trained as the template renders it, up to its end-of-turn token",
    "prefill": "the generation prompt opens a think block: kept in the prompt, untrained; the reasoning, </think>, "
               "the answer and the end-of-turn token trained after it",
    "conditional end": "the template closes the last turn with a token it writes only without a generation prompt: "
                       "each turn trained up to where its renders with and without one agree",
    "next header": "no token closes a turn: the first token of the next turn's header trained (a stop id of the "
                   "export)",
    "history": "earlier assistant turns rendered differently in the history (reasoning stripped, another end token): "
               "they stay context, untrained, as inference sees them",
}
PROBE_USER = {"role": "user", "content": "ok"}  # what follows the last turn, to find a next-header closing token


def _back_off(text: str, at: int, find: re.Pattern) -> int:
    """`at`, moved back to the start of the control token it falls inside of (never a cut inside a token)."""
    for m in find.finditer(text, max(0, at - 64)):
        if m.start() < at < m.end():
            return m.start()
    return at


def _turn_end(full: str, going_on: Optional[str], start: int, message: Mapping, find: re.Pattern) -> tuple[str, bool]:
    """The turn's text, up to where its renders without and with a generation prompt agree, after the turn's last
    control token (a token written only at the end of a conversation, like Phi-3's eos, is not the turn's); whether
    that cut anything. No cut where the two renders differ inside the turn (gpt-oss renders a last turn otherwise)."""
    if going_on is None or going_on.startswith(full):
        return full, False
    cut = _back_off(full, len(os.path.commonprefix([full, going_on])), find)
    ends = [m.end() for m in find.finditer(full, start, cut)]
    if ends and full[ends[-1]: cut].strip():
        cut = ends[-1]
    shown = plain(full[start:cut])
    if not ends or any(plain(v).strip() not in shown for v in (message["content"], message.get("reasoning_content"))
                       if v and v.strip()):
        return full, False
    return full[:cut], True


def _prefill(prompt: str, turn: str, find: re.Pattern) -> Optional[int]:
    """Where a generation prompt that opens a think block (`<think>\\n`, DeepSeek-R1) leaves the turn's render:
    the end of the text both share, before the pre-fill; None when the prompt does not end in an open think block."""
    k = prompt.rfind(THINK_OPEN)
    if k < 0 or THINK_CLOSE in prompt[k:]:
        return None
    common = _back_off(prompt, min(len(os.path.commonprefix([prompt, turn])), k), find)
    return common if common == k or not prompt[common:k].strip() else None


def _empty_think(prompt: str) -> Optional[int]:
    """Where a generation prompt's closing empty think block starts (Qwen3 under enable_thinking: false writes
    `<think>\n\n</think>\n\n`), which the history may render otherwise (without it); None when there is none."""
    k = prompt.rfind(THINK_OPEN)
    rest = prompt[k + len(THINK_OPEN):] if k >= 0 else ""
    if k < 0 or THINK_CLOSE not in rest or rest.replace(THINK_CLOSE, "", 1).strip():
        return None
    return k


def _prefilled_turn(prompt: str, turn: str, cut: int, reasoning: str) -> Optional[tuple[str, str]]:
    """(reasoning part, answer part) of the turn as the model writes it after the pre-fill: the record's reasoning
    (empty when it has none) closed by </think>, then the answer and end as the template renders them."""
    prefill = prompt[cut:]
    block = think_text(reasoning)
    if not block.startswith(prefill):
        return None
    kept = turn[cut:]
    if kept.lstrip().startswith(THINK_OPEN) and THINK_CLOSE in kept:  # the template's own (e.g. empty) think block
        kept = kept[kept.index(THINK_CLOSE) + len(THINK_CLOSE):]
    return block[len(prefill):], kept.lstrip()


def _next_header(turn: str, following: str, start: int, find: re.Pattern) -> Optional[str]:
    """The whitespace and control token that open what follows `turn` in `following` (GLM-4's `<|user|>`), found
    after the turn's last text (the turn itself may render otherwise once it is history, e.g. without reasoning)."""
    last = [m.end() for m in find.finditer(turn, start)]
    tail = turn[last[-1] if last else start:]
    at = len(turn) if following.startswith(turn) else following.rfind(tail) + len(tail) if tail.strip() else -1
    if at < len(tail) or following.find(tail, start) < 0:
        return None
    rest = following[at:]
    gap = len(rest) - len(rest.lstrip())
    m = find.match(rest, gap)
    return rest[: m.end()] if m else None


def render_native(example: Example, tokenizer, system_message: Optional[str] = None,
                  train_on_reasoning: bool = True, template_kwargs: Optional[Mapping] = None) -> Rendered:
    """An `Example` through the tokenizer's chat template, its segments marked trained by rendering prefixes;
    `template_kwargs`: `data.chat_template_kwargs`, passed to every render."""
    try:
        return _render_native(example, tokenizer, system_message, train_on_reasoning, template_kwargs)
    except RecordError as err:
        if not template_kwargs or err.reason != "template_not_prefix_stable":
            raise
        raise RecordError(err.reason, f"{err.message} (data.chat_template_kwargs {dict(template_kwargs)} shape the "
                          "renders too: e.g. enable_thinking: false pre-fills an empty think block, which a turn "
                          "with reasoning does not extend; drop the reasoning from such records or that kwarg)"
                          ) from None


def _render_native(example: Example, tokenizer, system_message: Optional[str], train_on_reasoning: bool,
                   template_kwargs: Optional[Mapping]) -> Rendered:
    find, split = _compiled(tokenizer)
    if example.kind == "text":
        segs = segments(example.prompt, False, split) + segments(example.completion, True, split)
        return Rendered(example.prompt, example.completion, tuple(segs), chat=False)
    field = reasoning_field(tokenizer.chat_template)
    messages, start = conversation(example, tokenizer, system_message, find)
    tools = mark(example.tools, find) if example.tools else None

    def draw(msgs: list, generation: bool, must: bool = True) -> Optional[str]:
        try:
            return render(tokenizer, msgs, tools, generation, template_kwargs)
        except RecordError:
            if must:
                raise
            return None  # a template may refuse a generation prompt after an assistant turn

    pieces = _Pieces(split)
    rules: set = set()
    head = None
    for j in range(start, len(messages)):
        message = example.completion[j - start]
        if message["role"] != "assistant":
            continue
        prompt = draw(messages[:j], True)
        rules.add(pieces.advance(prompt, False, f"messages[:{j}] with the generation prompt", history=True) or "prefix")
        head = pieces.text if head is None else head
        pieces.prompt_end = len(head) if pieces.prompt_end is None else pieces.prompt_end
        full, conditional = _turn_end(draw(messages[:j + 1], False), draw(messages[:j + 1], True, must=False),
                                      len(prompt), message, find)
        rules.update(["conditional end"] if conditional else [])
        reasoning = mark(message.get("reasoning_content") or "", find)
        masked = message.get("reasoning_content") is not None and not train_on_reasoning
        if masked and not answer_text(message):
            raise empty_answer()
        cut = None if full.startswith(prompt) else _prefill(prompt, full, find)
        parts = None if cut is None else _prefilled_turn(prompt, full, cut, reasoning)
        if parts is not None:  # the generation prompt pre-fills a think block
            rules.add("prefill")
            pieces.base = cut
            think, answer = parts
            if masked:
                pieces.advance(prompt + think, False, "the reasoning")
            pieces.advance(prompt + think + answer, True, f"messages[:{j + 1}]")
            turn = (think + answer).rstrip()
        else:
            opened = _prefill(prompt, prompt, find)  # a think block the prompt opens: history may render it otherwise
            opened = _empty_think(prompt) if opened is None else opened  # or holds empty (Qwen3, no thinking)
            pieces.base = len(pieces.text) if opened is None else opened
            turn = ""
            if masked:
                bare = {k: v for k, v in messages[j].items() if k != "tool_calls"}
                bare["content"] = "" if field else mark(think_text(message["reasoning_content"]), find)
                whole = draw(messages[:j + 1], False)
                common = os.path.commonprefix([draw(messages[:j] + [bare], False), whole])
                end = _reasoning_end(common, whole, len(pieces.text))
                if end is None or plain(message["reasoning_content"]).strip() not in plain(whole[len(prompt):end]):
                    raise RecordError("reasoning_not_separable", (
                        f"messages[{j}]: the reasoning cannot be told apart from the answer in what the chat template "
                        "renders (no </think> after it), so it cannot be masked; fix: set data.train_on_reasoning: "
                        "true, or use data.chat_template: chatml"))
                turn = whole[len(pieces.text):end]
                pieces.advance(whole[:end], False, "the reasoning")
            turn += full[len(pieces.text):].rstrip()
            pieces.advance(full, True, f"messages[:{j + 1}]")
        _check_turn(turn, message, j)
        if not pieces.closed_by_control():
            following = draw(messages[:j + 1] + [messages[j + 1] if j + 1 < len(messages) else PROBE_USER], False)
            header = _next_header(pieces.text.rstrip(), following, pieces.base, find)
            if header is None:
                raise end_of_turn_error(turn, j)
            rules.add("next header")
            pieces.text = pieces.text.rstrip()
            pieces.pieces = [(a, min(b, len(pieces.text)), t) for a, b, t in pieces.pieces if a < len(pieces.text)]
            pieces.advance(pieces.text + header, True, "the next turn's header")
            pieces.turns.pop()  # the same turn
    whole = draw(messages, False)
    if whole.startswith(pieces.text):
        pieces.advance(whole, False, "the whole conversation")
    elif not (pieces.text.startswith(whole) or whole.startswith(pieces.text[: pieces.base])):
        pieces.advance(whole, False, "the whole conversation")  # raises: not prefix-stable
    if tools and not all(plain(str(t.get("function", t).get("name", ""))) in plain(head or "") for t in tools):
        raise RecordError("template_drops_content", "the chat template does not render the record's tools in the "
                                                    "prompt; fix: use a template with tool support, or "
                                                    "data.chat_template: chatml")
    cut_at = pieces.prompt_end or 0
    return Rendered(plain(pieces.text[:cut_at]), plain(pieces.text[cut_at:]), tuple(pieces.segments()),
                    rules=tuple(sorted(rules)), history_untrained=pieces.history_untrained)


def render_prompt(messages: Sequence[Mapping], tokenizer, system_message: Optional[str] = None,
                  tools: Optional[list] = None, template_kwargs: Optional[Mapping] = None) -> Rendered:
    """A conversation so far with the generation prompt: what a model is asked to continue (`raysft generate`)."""
    find, split = _compiled(tokenizer)
    native, _ = conversation(Example("chat", list(messages), []), tokenizer, system_message, find)
    text = render(tokenizer, native, mark(tools, find) if tools else None, True, template_kwargs)
    return Rendered(plain(text), "", tuple(segments(text, False, split)))


def end_of_turn(tokenizer, template_kwargs: Optional[Mapping] = None) -> Optional[str]:
    """The control token the tokenizer's template closes an assistant turn with (None when it closes with none).

    Found by rendering a two-message probe conversation, as training does; once per tokenizer, template and
    template kwargs."""
    cached = _end_of_turn.get(tokenizer)
    key = (tokenizer.chat_template, len(tokenizer), repr(sorted((template_kwargs or {}).items())))
    if cached is not None and cached[0] == key:
        return cached[1]
    probe = Example("chat", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])
    try:
        rendered = render_native(probe, tokenizer, template_kwargs=template_kwargs)
    except RecordError:
        rendered = None
    trained = [s for s in rendered.segments if s.trained] if rendered else []
    found = trained[-1].text if trained and trained[-1].control else None
    _end_of_turn[tokenizer] = (key, found)
    return found


def stop_ids(tokenizer, also=(), template_kwargs: Optional[Mapping] = None) -> list[int]:
    """The ids generation stops at: the template's end-of-turn token first, then `also` (e.g. the base model's
    generation eos ids), then the tokenizer's eos; each once."""
    eot = end_of_turn(tokenizer, template_kwargs)
    out = [tokenizer.convert_tokens_to_ids(eot)] if eot else []
    for token_id in [*also, tokenizer.eos_token_id]:
        if token_id is not None and token_id not in out:
            out.append(token_id)
    return out
