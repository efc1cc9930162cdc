"""What the template path cannot train, in the user's words: the RecordError of each case (a template that drops
part of a turn, ends a turn with no token, renders the history otherwise under a generation prompt, or leaves a
turn's reasoning untrained), and the template variable that would render the reasoning, found by trying the
template's own variables. This module imports neither ray nor torch.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

from raysft.data.parsing import shorten
from raysft.data.records import RecordError
from raysft.data.rendering import plain

THINKING = re.compile(r"think|reason", re.I)  # template variables that may switch reasoning on


def drops_error(what: list[str], turn: str, j: int) -> RecordError:
    return RecordError("template_drops_content", f"messages[{j}]: the chat template does not render "
                                                 f"{', '.join(what)} of this assistant turn (rendered: "
                                                 f"{shorten(plain(turn), 120)}); fix: use a template that renders "
                                                 "it (tool calls need a template with tool support), or "
                                                 "data.chat_template: chatml")


def end_of_turn_error(turn: str, j: int) -> RecordError:
    return RecordError("no_end_of_turn", f"messages[{j}]: the chat template ends this assistant turn without a "
                                         f"control token (it ends with {shorten(plain(turn)[-30:])}), and no "
                                         "control token opens the next turn, so the model would never learn to "
                                         "stop; fix: add the template's end-of-turn token to the tokenizer as a "
                                         "special token, or use data.chat_template: chatml")


def history_differs(prompt: str, full: str, k: int, j: int) -> RecordError:
    return RecordError("template_not_prefix_stable", (
        f"messages[{j}]: the chat template renders the conversation before this turn one way with the generation "
        f"prompt and another without it (they part at character {k}: {shorten(plain(prompt[k:k + 40]))} vs "
        f"{shorten(plain(full[k:k + 40]))}), so no text after the prompt is this turn alone; fix: use a template "
        "that renders the history the same way in both, or data.chat_template: chatml"))


def thinking_kwarg(attempt: Callable[[dict], object], template: str, kwargs: Optional[Mapping]) -> Optional[dict]:
    """The template variable (and value) under which `attempt(kwargs)` (the record rendered and checked) succeeds:
    DeepSeek-V3.1's `thinking`, Qwen3's `enable_thinking`, gpt-oss' `reasoning_effort`, found among the template's
    own variables; None when none does."""
    from jinja2 import Environment, meta

    try:
        names = meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    except Exception:  # a template only transformers' own environment reads (its extensions): no guess then
        return None
    for name in sorted(n for n in names if THINKING.search(n)):
        for value in (True, "high", False):
            if (kwargs or {}).get(name, object()) == value:
                continue
            try:
                attempt({**(kwargs or {}), name: value})
            except RecordError:
                continue
            return {name: value}
    return None


def kwarg_text(kwarg: Mapping) -> str:
    return ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in kwarg.items())


class ReasoningLost(RecordError):
    """A turn's reasoning not trained: the template drops it (`prefill` empty) or pre-fills thinking off."""

    def __init__(self, j: int, turn: str, prefill: str = ""):
        super().__init__("template_drops_content", f"messages[{j}]: reasoning lost")
        self.j, self.turn, self.prefill = j, turn, prefill

    def error(self, kwarg: Optional[dict], kwargs: Optional[Mapping]) -> RecordError:
        set_it = f"set data.chat_template_kwargs: {{{kwarg_text(kwarg)}}}" if kwarg else ""
        if self.prefill:
            given = f" under data.chat_template_kwargs {{{kwarg_text(kwargs)}}}" if kwargs else ""
            return RecordError("thinking_off", (
                f"messages[{self.j}]: this turn has reasoning, but the chat template's generation prompt{given} "
                f"pre-fills {shorten(plain(self.prefill), 40)} (thinking off: e.g. enable_thinking: false pre-fills "
                f"an empty think block), which a turn with reasoning does not follow; fix: "
                f"{set_it or 'turn thinking on with the template variable in data.chat_template_kwargs'}, or drop "
                "the reasoning from such records"))
        if kwarg:
            return RecordError("reasoning_needs_kwarg", (
                f"messages[{self.j}]: the chat template renders this turn's reasoning only with the template "
                f"variable {kwarg_text(kwarg)} (rendered: {shorten(plain(self.turn), 80)}); fix: {set_it}, or "
                "give such records a chat_template_kwargs field, or drop their reasoning"))
        return drops_error(["its reasoning"], self.turn, self.j)
