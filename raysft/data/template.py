"""Messages -> segments through the tokenizer's own Jinja chat template (`data.chat_template: auto | model | PATH`).

transformers renders the template; raysft never re-implements a model's format, nor keeps a rule per model family.
Each assistant turn trains as inference sees it (`alignment.py`): its prompt is exactly
``apply_chat_template(messages before it, add_generation_prompt=True)``, untrained, pre-fill included, and what is
trained is what the model must write after that prompt for the conversation to read as the template renders the
finished turn — its reasoning (where the record has it and the template renders it), content, tool calls, and the
token (or next header) that ends it. Each turn is checked: its content, reasoning and tool calls must be in what is
trained (a template that drops them is an error, never a silent loss; reasoning that only a template variable
renders is an error naming that variable), and the turn must end on a control token. This module imports neither
ray nor torch.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import Mapping, Optional, Sequence

from raysft.data.alignment import (
    PROBE_NEXT,
    Pieces,
    align,
    align_inserted,
    before_next_header,
    inside_history,
    lost,
    next_header,
    once_followed,
    open_think,
    reasoning_end,
    turn_end,
)
from raysft.data.chatml import Rendered, answer_text, empty_answer, think_text
from raysft.data.records import Example, RecordError
from raysft.data.rendering import (
    compiled,
    control_tokens,
    conversation,
    mark,
    plain,
    reasoning_field,
    render,
    segments,
)
from raysft.data.template_errors import (
    ReasoningLost,
    drops_error,
    end_of_turn_error,
    history_differs,
    thinking_kwarg,
)

__all__ = ["RULES", "compiled", "control_tokens", "conversation", "end_of_turn", "render_native", "render_prompt",
           "stop_ids"]
_end_of_turn: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> ((template, size), token)
_appends: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (key, the probe rendered alone)

RULES = {  # how a model's template was read, as the preflight reports it (docs: "Chat templates")
    "prefix": "each turn trained as the template renders it after the generation prompt, up to its end-of-turn "
              "token",
    "prefill": "the generation prompt writes text the finished turn renders otherwise (an empty think block, a "
               "channel, a sentence, a blank line): kept in the prompt, untrained; the finished turn's text after "
               "what the two share trained",
    "open think": "the generation prompt opens a think block: the record's reasoning (or none), </think>, the "
                  "answer and the end-of-turn token trained after it",
    "conditional end": "the template closes the last turn with a token it writes only without a generation prompt: "
                       "each turn trained up to where its renders with and without one agree",
    "next header": "no token closes a turn: the first token of the next turn's header trained (a stop id of the "
                   "export)",
    "once followed": "the template renders a turn only once a message follows it (a tool call before its result): "
                     "the turn read from that render, up to the template's end-of-turn token",
    "history": "earlier assistant turns rendered differently in the history (reasoning stripped, another end token, "
               "other whitespace): they stay context, untrained, as inference sees them",
}
PROBE_USER = {"role": "user", "content": "ok"}  # what follows the last turn, to find a next-header closing token


def render_native(example: Example, tokenizer, system_message: Optional[str] = None,
                  train_on_reasoning: bool = True, template_kwargs: Optional[Mapping] = None) -> Rendered:
    """An `Example` through the tokenizer's chat template, its segments marked trained as inference sees each
    assistant turn; `template_kwargs`: `data.chat_template_kwargs`, passed to every render. Where the record's
    reasoning is not trained as the template is called, the error names the template variable that would."""
    if example.template_kwargs:  # the record's own, over data.chat_template_kwargs (as TRL merges them)
        template_kwargs = {**(template_kwargs or {}), **example.template_kwargs}
    try:
        return _render_native(example, tokenizer, system_message, train_on_reasoning, template_kwargs)
    except ReasoningLost as err:
        kwarg = thinking_kwarg(lambda kw: _render_native(example, tokenizer, system_message, train_on_reasoning, kw),
                               tokenizer.chat_template or "", template_kwargs)
        raise err.error(kwarg, template_kwargs) from None


def _render_native(example: Example, tokenizer, system_message: Optional[str], train_on_reasoning: bool,
                   template_kwargs: Optional[Mapping]) -> Rendered:
    find, split = compiled(tokenizer)
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

    pieces = Pieces(find, split)
    rules: set = set()
    head = None
    for j in range(start, len(messages)):
        message = example.completion[j - start]
        if message["role"] != "assistant":
            continue
        prompt = draw(messages[:j], True)
        if pieces.advance(prompt, False, f"messages[:{j}] with the generation prompt", history=True):
            rules.add("history")
        head = prompt if head is None else head
        pieces.prompt_end = len(prompt) if pieces.prompt_end is None else pieces.prompt_end
        full = draw(messages[:j + 1], False)
        i, k = align(prompt, full, find)
        if lost(full[k:], message):  # the answer may start with the pre-fill's first words: cut at a line instead
            at_line = align(prompt, full, find, at_line=True)
            i, k = at_line if not lost(full[at_line[1]:], message) else (i, k)
        if lost(full[k:], message) and j + 1 < len(messages):  # e.g. a tool call rendered only before its result
            later = draw(messages[:j + 2], False, must=False) or ""
            i2, k2 = align(prompt, later, find)
            end = once_followed(later, k2, message, messages[j + 1], end_of_turn(tokenizer, template_kwargs))
            if later and end is not None:
                full, i, k = later[:end], i2, k2
                rules.add("once followed")
        if not full.startswith(prompt) and inside_history(messages[j - 1], full, k):
            i, k = align_inserted(prompt, full, find)
            if inside_history(messages[j - 1], full, k):
                raise history_differs(prompt, full, k, j)
        full, conditional = turn_end(full, draw(messages[:j + 1], True, must=False), k, message, find)
        alone = _appended_header(tokenizer, template_kwargs, find)
        if alone is not None:  # a template that appends the next assistant header (Command-A's, Gemma's)
            full, appended = before_next_header(full, k, draw(messages[:j + 1] + [PROBE_NEXT], False, must=False),
                                                alone, prompt, str(messages[j - 1].get("content") or ""),
                                                tokenizer.bos_token, find)
            conditional = conditional or appended
        rules.update(["conditional end"] if conditional else [])
        reasoning = mark(message.get("reasoning_content") or "", find)
        masked = message.get("reasoning_content") is not None and not train_on_reasoning and not message.get(
            "switched_off")
        if masked and not answer_text(message):
            raise empty_answer()
        think_answer = open_think(prompt[i:], full[k:], reasoning)
        if think_answer is not None:
            rules.add("open think")
            think, answer = think_answer
        else:
            rules.add("prefix" if k == len(prompt) == i else "prefill")
            if find.search(prompt[i:]) and message.get("reasoning_content") and plain(reasoning).strip() in plain(
                    full[k:]):  # a pre-fill that closes a think block or channel: thinking off
                raise ReasoningLost(j, full[k:], prompt[i:])
            think = ""
            if masked:
                bare = {key: v for key, v in messages[j].items() if key != "tool_calls"}
                bare["content"] = "" if field else mark(think_text(message["reasoning_content"]), find)
                common = _common(draw(messages[:j] + [bare], False), full)
                end = reasoning_end(common, full, k)
                if end is None or plain(reasoning).strip() not in plain(full[k:end]):
                    raise RecordError("reasoning_not_separable", (
                        f"messages[{j}]: the reasoning cannot be told apart from the answer in what the chat "
                        "template renders (no </think> after it), so it cannot be masked; fix: set "
                        "data.train_on_reasoning: true, or use data.chat_template: chatml"))
                think = full[k:end]
            answer = full[k + len(think):]
        if message.get("switched_off"):  # a training flag: the turn is context, as history is
            pieces.advance(prompt + think + answer, None, f"messages[:{j + 1}]")
            continue
        pieces.open_turn()
        if masked and think:
            pieces.advance(prompt + think, False, "the reasoning")
        pieces.advance(prompt + think + answer, True, f"messages[:{j + 1}]")
        turn = (think + answer).rstrip()
        missing = lost(turn, message)
        if missing == ["its reasoning"]:
            raise ReasoningLost(j, turn)
        if missing:
            raise drops_error(missing, turn, j)
        if not pieces.closed_by_control():
            following = draw(messages[:j + 1] + [messages[j + 1] if j + 1 < len(messages) else PROBE_USER], False)
            header = next_header(pieces.text.rstrip(), following, pieces.turns[-1][0], find)
            if header is None:
                raise end_of_turn_error(turn, j)
            rules.add("next header")
            pieces.close_with(header)
    whole = draw(messages, False)
    if whole.startswith(pieces.text):
        pieces.advance(whole, False, "the whole conversation")
    if tools and not all(plain(str(t.get("function", t).get("name", ""))) in plain(head or "") for t in tools):
        raise RecordError("template_drops_content", "the chat template does not render the record's tools in the "
                                                    "prompt; fix: use a template with tool support, or "
                                                    "data.chat_template: chatml")
    cut_at = pieces.prompt_end or 0
    return Rendered(plain(pieces.text[:cut_at]), plain(pieces.text[cut_at:]), tuple(pieces.segments()),
                    rules=tuple(sorted(rules)), history_untrained=pieces.history_untrained)


def _common(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def render_prompt(messages: Sequence[Mapping], tokenizer, system_message: Optional[str] = None,
                  tools: Optional[list] = None, template_kwargs: Optional[Mapping] = None) -> Rendered:
    """A conversation so far with the generation prompt: what a model is asked to continue (`raysft generate`)."""
    find, split = compiled(tokenizer)
    native, _ = conversation(Example("chat", list(messages), []), tokenizer, system_message, find)
    text = render(tokenizer, native, mark(tools, find) if tools else None, True, template_kwargs)
    return Rendered(plain(text), "", tuple(segments(text, False, split)))


def _per_tokenizer(store: "weakref.WeakKeyDictionary", tokenizer, kwargs: Optional[Mapping], compute):
    """`compute()` once per tokenizer, template, vocabulary size and template kwargs (a probe's finding)."""
    key = (tokenizer.chat_template, len(tokenizer), repr(sorted((kwargs or {}).items())))
    cached = store.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = compute()
    store[tokenizer] = (key, found)
    return found


def _appended_header(tokenizer, kwargs: Optional[Mapping], find: re.Pattern) -> Optional[str]:
    """For a template that renders something after a finished conversation's last turn where a next turn's header
    would go (an assistant header, always), a next user turn rendered alone (what `before_next_header` reads the
    header from); None for the others. Found on a probe conversation, once per tokenizer, template and kwargs."""
    def probe() -> Optional[str]:
        try:
            said = [{"role": "user", "content": "hi"}]
            msgs = said + [{"role": "assistant", "content": "hello"}]
            prompt, full = render(tokenizer, said, None, True, kwargs), render(tokenizer, msgs, None, False, kwargs)
            alone = render(tokenizer, [PROBE_NEXT], None, False, kwargs)
            _, cut = before_next_header(full, align(prompt, full, find)[1], render(
                tokenizer, msgs + [PROBE_NEXT], None, False, kwargs), alone, prompt, "hi", tokenizer.bos_token, find)
        except RecordError:
            return None
        return alone if cut else None

    return _per_tokenizer(_appends, tokenizer, kwargs, probe)


def end_of_turn(tokenizer, template_kwargs: Optional[Mapping] = None) -> Optional[str]:
    """The control token the tokenizer's template closes an assistant turn with (None when it closes with none).

    Found by rendering a two-message probe conversation, as training does; once per tokenizer, template and
    template kwargs."""
    def probe() -> Optional[str]:
        hello = Example("chat", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}])
        try:
            rendered = render_native(hello, tokenizer, template_kwargs=template_kwargs)
        except RecordError:
            return None
        trained = [s for s in rendered.segments if s.trained]
        return trained[-1].text if trained and trained[-1].control else None

    return _per_tokenizer(_end_of_turn, tokenizer, template_kwargs, probe)


def stop_ids(tokenizer, also=(), template_kwargs: Optional[Mapping] = None) -> list[int]:
    """The ids generation stops at: the template's end-of-turn token first, then `also` (e.g. the base model's
    generation eos ids), then the tokenizer's eos; each once."""
    eot = end_of_turn(tokenizer, template_kwargs)
    out = [tokenizer.convert_tokens_to_ids(eot)] if eot else []
    for token_id in [*also, tokenizer.eos_token_id]:
        if token_id is not None and token_id not in out:
            out.append(token_id)
    return out
