"""How one assistant turn trains, read the same way for every chat template: the inference view.

    P = render(messages before the turn, add_generation_prompt=True)   # what inference shows: the prompt, untrained
    F = render(messages up to and with the turn)                       # the conversation once the turn is written

The trained text is what the model must write after P for the conversation to read as F. `align` walks P and F
side by side to where they part (whitespace the two renders place differently is skipped); what F has from there
is trained, up to the turn's end. Where P writes text F lacks (a pre-fill: a closed empty think block, a reasoning
channel, a sentence, a blank line), the row is P, exactly, followed by that rest of F. The same walk, on the
conversation so far, decides what a later prompt re-renders: earlier turns the history renders otherwise become
untrained context (`Pieces.advance(..., history=True)`), never a trained fragment.

What remains template-specific is a small named function each, with its fixture in the tests:
`open_think` (a pre-fill that opens a think block: the record's reasoning, closed, is written after it),
`turn_end` (a token a template writes only at the end of a conversation is not the turn's), `next_header` (no
token closes a turn: the next turn's header token is trained). This module imports neither ray nor torch.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Mapping, Optional

from raysft.data.chatml import Segment, think_text
from raysft.data.messages import THINK_CLOSE, THINK_OPEN
from raysft.data.parsing import shorten
from raysft.data.records import RecordError
from raysft.data.rendering import back_off, plain, segments, shared

PROBE_NEXT = {"role": "user", "content": "\u2042 next"}  # a next user turn, to find where its header starts


def align(prompt: str, full: str, find: re.Pattern, at_line: bool = False) -> tuple[int, int]:
    """(i, k): `prompt[:i]` reads as `full[:k]` (the same text, up to whitespace placed otherwise); i == len(prompt)
    when all of the prompt is in `full`. Where they part inside a line, `at_line` cuts at the last line end or
    control token both reached instead (for an answer that starts with the pre-fill's first words).

    >>> find = re.compile("<s>|</s>")
    >>> align("<s>user: hi\\nbot:\\n", "<s>user: hi\\nbot: hello</s>", find)
    (17, 17)
    >>> align("<s>user: hi\\nbot: Sure thing:\\n", "<s>user: hi\\nbot: hello</s>", find)
    (17, 17)
    >>> align("<s>user: hi\\nbot: Sure thing:\\n", "<s>user: hi\\nbot: Sure is</s>", find, at_line=True)
    (12, 12)
    """
    if full.startswith(prompt):
        return len(prompt), len(prompt)
    i = k = shared(prompt, full, find)
    ends = {m.end() for m in find.finditer(prompt)}
    cut = max(prompt.rfind("\n", 0, i) + 1, max((e for e in ends if e <= i), default=0))
    line = (cut, cut)
    while i < len(prompt):
        if k < len(full) and (prompt[i] == full[k] or prompt[i].isspace() and full[k].isspace()):
            i, k = i + 1, k + 1
        elif prompt[i].isspace():
            i += 1
        elif k < len(full) and full[k].isspace():
            k += 1
        else:
            break
        if prompt[i - 1] == "\n" or i in ends:
            line = (i, k)
    if i < len(prompt):
        inside = back_off(prompt, i, find)  # never a cut inside a control token: its characters matched, no spaces
        i, k = inside, k - (i - inside)
    return line if at_line and i < len(prompt) else (i, k)


def align_inserted(prompt: str, full: str, find: re.Pattern) -> tuple[int, int]:
    """(i, k) as `align`, for a generation prompt that renders text inside the history the finished turn lacks
    (Mistral v0.3 folds the system message into the last user turn only while that turn is last): the prompt's end
    mapped into `full` through the last run of text the two share (difflib's matching blocks)."""
    h = shared(prompt, full, find)
    blocks = [b for b in difflib.SequenceMatcher(None, prompt[h:], full[h:], autojunk=False).get_matching_blocks()
              if b.size]
    if not blocks:
        return h, h
    a, b, size = blocks[-1]
    i, k = h + a + size, h + b + size
    inside = back_off(prompt, i, find)
    return inside, k - (i - inside)


def open_think(prefill: str, rest: str, reasoning: str) -> Optional[tuple[str, str]]:
    """A generation prompt that opens a think block (DeepSeek-R1's `<think>\\n`, QwQ): (reasoning part, answer part)
    of what the model writes after it — the record's reasoning (empty when it has none) closed by `</think>`, then
    the turn as the template renders it (its own think block dropped); None when the pre-fill is not that."""
    block = think_text(reasoning)
    if not prefill.strip() or not block.startswith(prefill):
        return None
    if rest.lstrip().startswith((THINK_OPEN, THINK_CLOSE)) and THINK_CLOSE in rest:  # the turn's own (empty) block
        rest = rest[rest.index(THINK_CLOSE) + len(THINK_CLOSE):]
    return block[len(prefill):], rest.lstrip()


def reasoning_end(common: str, full: str, start: int) -> Optional[int]:
    """Where the reasoning ends in `full`, from the text it shares with the render without the answer: after the
    last `</think>` and the whitespace after it; None without one (never a cut inside a token of the answer)."""
    close = common.rfind(THINK_CLOSE, start)
    if close < 0:
        return None
    end = close + len(THINK_CLOSE)
    return end + len(full[end:]) - len(full[end:].lstrip())


def turn_end(full: str, going_on: Optional[str], start: int, message: Mapping, find: re.Pattern) -> tuple[str, bool]:
    """The turn's text, up to where its renders without and with a generation prompt agree, after the turn's last
    control token (a token written only at the end of a conversation, like Phi-3's eos, is not the turn's); whether
    that cut anything. No cut where the two renders differ inside the turn (gpt-oss renders a last turn otherwise)."""
    if going_on is None or going_on.startswith(full):
        return full, False
    cut = back_off(full, len(os.path.commonprefix([full, going_on])), find)
    ends = [m.end() for m in find.finditer(full, start, cut)]
    if ends and full[ends[-1]: cut].strip():
        cut = ends[-1]
    shown = plain(full[start:cut])
    if not ends or any(plain(v).strip() not in shown for v in (message["content"], message.get("reasoning_content"))
                       if v and v.strip()):
        return full, False
    return full[:cut], True


def next_header(turn: str, following: str, start: int, find: re.Pattern) -> Optional[str]:
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


def lost(turn: str, message: Mapping) -> list[str]:
    """What of an assistant turn (content, reasoning, tool calls) the template's render of it lacks."""
    shown = plain(turn)
    out = []
    if message["content"].strip() and plain(message["content"]).strip() not in shown:
        out.append("its content")
    if message.get("reasoning_content") and plain(message["reasoning_content"]).strip() not in shown:
        out.append("its reasoning")
    for call in message.get("tool_calls", ()):
        if plain(call["function"]["name"]) not in shown:
            out.append(f"tool call {call['function']['name']!r}")
    return out


def before_next_header(full: str, start: int, following: Optional[str], alone: Optional[str], prompt: str,
                        said: str, bos: Optional[str], find: re.Pattern) -> tuple[str, bool]:
    """`full` cut where a next user turn's header would start, when `full` renders something else there (an
    assistant header a template always appends: Command-A's, Gemma's); whether it cut. The header: the control tokens
    (and text) right before the probe's content rendered alone, after the last token that ends a turn (the first
    control token after the previous message's content in `prompt`)."""
    content = PROBE_NEXT["content"]
    if not following or not alone or content not in alone:
        return full, False
    before = alone[: alone.index(content)]
    tokens = list(find.finditer(before))
    if not tokens:
        return full, False
    run = len(tokens) - 1
    while run and tokens[run - 1].end() == tokens[run].start():
        run -= 1
    ender = find.search(prompt, prompt.rfind(said) + len(said)) if said and said in prompt else None
    header_at = tokens[run].start()
    for m in tokens[run:]:
        if m.group(0) in (ender.group(0) if ender else None, bos):
            header_at = m.end()
    header = before[header_at:]
    at = following.rfind(header + content) if header.strip() else -1
    if at < start or not full.startswith(following[:at]) or not full[at:].strip() or not find.search(full, start, at):
        return full, False
    return full[:at], True


def once_followed(later: str, k: int, message: Mapping, following: Mapping, eot: Optional[str]) -> Optional[int]:
    """Where a turn the template renders only once a message follows it (Nemotron's tool calls, before their result)
    ends in the render with that message: at the template's end-of-turn token, with all of the turn before it and
    nothing of the next message; None when it is not so."""
    at = later.find(eot, k) if eot else -1
    nxt = str(following.get("content") or "").strip()
    if at < 0 or lost(later[k:at], message) or (nxt and nxt in later[k:at]):
        return None
    return at + len(eot)


def inside_history(previous: Mapping, full: str, k: int) -> bool:
    """Whether what would be trained from `k` on holds the message before the turn (first rendered there): then
    the generation prompt renders the conversation before the turn otherwise, not just a pre-fill."""
    said = str(previous.get("content") or "").strip()
    return bool(said) and full.find(said) >= k


class Pieces:
    """The row's text as it grows render by render: spans of it, trained or not, and the trained turns' spans.

    Only its own methods edit it. A later prompt that renders the text so far otherwise (history) is taken from
    where the two part; a trained turn cut there becomes untrained context whole, never a fragment."""

    def __init__(self, find: re.Pattern, split: re.Pattern):
        self.find, self.split = find, split
        self.text = ""
        self.pieces: list[tuple[int, int, Optional[bool]]] = []  # (start, end, trained) spans of `text`; trained
        # None: a turn the record switched off (a training flag), untrained under loss_on: all too
        self.prompt_end: Optional[int] = None  # where the prompt (the first generation prompt) ends
        self.turns: list[list[int]] = []  # [start, end] of each trained turn (its masked reasoning included)
        self.history_untrained = 0

    def _differs(self, text: str, what: str) -> RecordError:
        at = next((i for i, (a, b) in enumerate(zip(text, self.text)) if a != b), min(len(text), len(self.text)))
        return RecordError("template_not_prefix_stable", (
            f"the chat template is not prefix-stable for this record: rendering {what} does not extend the "
            f"render before it (they differ at character {at}: {shorten(plain(text[at:at + 40]))} vs "
            f"{shorten(plain(self.text[at:at + 40]))}), so the model would train on text it never sees at "
            "inference; fix: use a template that renders earlier turns as it renders the last one, or "
            "data.chat_template: chatml"))

    def open_turn(self) -> None:
        self.turns.append([len(self.text), len(self.text)])

    def advance(self, text: str, trained: bool, what: str, history: bool = False) -> bool:
        """Continue with `text`, which must extend what is there; with `history` it may render what is there
        otherwise: it is taken from where the two part (returns True then)."""
        rewound = False
        if not text.startswith(self.text):
            if not history:
                raise self._differs(text, what)
            self._rewind(self._parting(text))
            rewound = True
        start = len(self.text)
        piece = text[start:]
        body = piece.rstrip() if trained else piece
        self.pieces.append((start, start + len(body), trained))
        if len(body) < len(piece):
            self.pieces.append((start + len(body), len(text), False))
        if trained:
            self.turns[-1][1] = start + len(body)
        self.text = text
        return rewound

    def _parting(self, text: str) -> int:
        at = shared(text, self.text, self.find)
        return min([at] + [a for a, b in self.turns if a < at < b])

    def _rewind(self, at: int) -> None:
        self.history_untrained += sum(a >= at for a, _ in self.turns)
        self.turns = [t for t in self.turns if t[0] < at]
        self.pieces = [(a, min(b, at), t) for a, b, t in self.pieces if a < at]
        self.text = self.text[:at]
        self.prompt_end = min(self.prompt_end, at) if self.prompt_end is not None else None

    def close_with(self, header: str) -> None:
        """The turn ends with the next turn's header token (trained), right after its text."""
        end = len(self.text.rstrip())
        self.pieces = [(a, min(b, end), t) for a, b, t in self.pieces if a < end]
        self.text = self.text[:end]
        self.advance(self.text + header, True, "the next turn's header")

    def last_trained(self) -> str:
        a, b, _ = next(p for p in reversed(self.pieces) if p[2])
        return self.text[a:b]

    def closed_by_control(self) -> bool:
        """The last trained piece ends with a control token (the end-of-turn token a model learns to stop at)."""
        last = segments(self.last_trained(), True, self.split)
        return bool(last) and last[-1].control

    def segments(self) -> list[Segment]:
        return [seg if trained is not None else seg._replace(off=True) for a, b, trained in self.pieces
                for seg in segments(self.text[a:b], bool(trained), self.split)]
