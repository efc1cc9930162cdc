"""Before Ray starts: the chat template and the loss mask checked on a sample of the records.

Silent failures of SFT tools are masks that train nothing or everything, an end-of-turn token never trained
(the model never stops), and prompts tokenized unlike inference. `preflight` renders and tokenizes the first
records of the training data exactly as the Ray Data tasks will, and refuses to go on, naming the record, when:

- the template is not prefix-stable, drops a turn's content, reasoning or tool calls, or closes an assistant turn
  with no control token (raised while rendering, see `template.py`);
- an example has no trained token, or every token is trained;
- no control token (the template's end-of-turn token, or another that closes a turn) is among the trained labels;
- the prompt's ids differ from `tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
  sanitize_control_tokens=True)`: what the model is given at inference.

It also measures, for each later assistant turn of a multi-turn completion, whether the ids before that turn equal
what `apply_chat_template` gives for the conversation so far (the history as inference tokenizes it), and reports
the share. This module imports neither ray nor torch.
"""

from __future__ import annotations

import difflib
from typing import Optional

from raysft.data.chunks import Settings, example_of, mask_error, render
from raysft.data.reading import read_chunk
from raysft.data.records import MESSAGE_FIELDS, RECORD_FIELDS, ROLE_VALUES, RecordError
from raysft.data.sources import Chunk
from raysft.data.template import _compiled, control_tokens, conversation, end_of_turn
from raysft.data.tokenize import IGNORE_INDEX, tokenize_rendered
from raysft.errors import UserError, format_error

SAMPLE = 64  # records: enough to see every shape a dataset's first chunk has, a fraction of a second
FATAL = {"template_not_prefix_stable", "template_drops_content", "no_end_of_turn", "no_trained_tokens",
         "all_trained", "end_of_turn_untrained", "prompt_differs"}


def _inference_ids(tokenizer, messages: list, tools: Optional[list], kwargs: Optional[dict] = None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        sanitize_control_tokens=True, return_dict=False, **(kwargs or {}))
    return list(out)


def _fail(err: RecordError, where: str, checked: int) -> UserError:
    records = f"{checked} records" if checked != 1 else "record"
    return UserError(f"{err.at(where)} (found by the chat template check before training, on the first {records}; "
                     "it is the template or the tokenizer, not this record alone)")


def _first(chunks: list[Chunk], settings: Settings, sample: int) -> list:
    out: list = []
    for chunk in chunks:
        for item in read_chunk(chunk, settings.hf_split):
            if len(out) >= sample:
                return out
            out.append(item)
    return out


def check_example(record, settings: Settings, tokenizer, closers) -> tuple[int, int, tuple]:
    """One record's checks; returns (later assistant turns, those whose history is tokenized as at inference, the
    template rules its render applied). Raises RecordError: a data problem (the prepare policy decides) or one of
    FATAL (the template's)."""
    example = example_of(record, settings)
    rendered = render(record, settings, tokenizer, example)
    ids, labels = tokenize_rendered([rendered], tokenizer, settings.loss_on)[0]
    broken = mask_error(rendered, labels, settings.loss_on)
    if broken is not None:
        raise broken
    if not rendered.chat or settings.loss_on != "completion":
        return 0, 0, rendered.rules
    trained = {lab for lab in labels if lab != IGNORE_INDEX}
    if not trained & set(closers):  # a turn may close with another control token (a tool call's, e.g. <|call|>)
        raise RecordError("end_of_turn_untrained", "the end-of-turn token is not among the trained labels, so the "
                                                   "model would never learn to stop; fix: check data.chat_template")
    messages, start = conversation(example, tokenizer, settings.system_message)
    if _compiled(tokenizer)[0].search(str(messages) + str(example.tools)):
        return 0, 0, rendered.rules  # control-token syntax typed in the data: kept as text, unlike a plain render
    kwargs = settings.chat_template_kwargs
    prompt = _inference_ids(tokenizer, messages[:start], example.tools, kwargs)
    if rendered.history_untrained and ids[: len(prompt)] != prompt:
        prompt = _first_trained_prompt(tokenizer, messages, start, example.tools, kwargs, ids, labels) or prompt
    masked_reasoning = not settings.train_on_reasoning and example.completion[0].get("reasoning_content") is not None
    starts = (labels[len(prompt): len(prompt) + 1] != [IGNORE_INDEX] or masked_reasoning  # masked reasoning first
              or rendered.history_untrained > 0)  # the first turn re-rendered as history: context, untrained
    if ids[: len(prompt)] != prompt or not starts or set(labels[: len(prompt)]) - {IGNORE_INDEX}:
        at = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(ids), len(prompt)))
        raise RecordError("prompt_differs", f"the prompt's token ids differ from apply_chat_template(prompt, "
                                            f"add_generation_prompt=True) at token {at} (training "
                                            f"{ids[at:at + 5]}, inference {prompt[at:at + 5]}), or the trained part "
                                            "does not start right after it; fix: report this with the template")
    later = same = 0
    for j in range(start + 1, len(messages)):
        if messages[j]["role"] != "assistant":
            continue
        later += 1
        history = _inference_ids(tokenizer, messages[:j], example.tools, kwargs)
        same += ids[: len(history)] == history
    return later, same, rendered.rules


def _first_trained_prompt(tokenizer, messages: list, start: int, tools, kwargs, ids: list, labels: list):
    """When the first turns became history (their prompt renders otherwise once they are, e.g. Qwen3's empty think
    block under enable_thinking: false), the prompt of the first turn still trained, as inference gives it."""
    for j in range(start + 1, len(messages)):
        if messages[j]["role"] == "assistant":
            prompt = _inference_ids(tokenizer, messages[:j], tools, kwargs)
            if ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}:
                return prompt
    return None


def _names(records: list) -> tuple[set, set, set]:
    """The record fields, message keys and role values the records have."""
    fields, keys, roles = set(), set(), set()
    for record in records:
        fields.update(record)
        for value in record.values():
            for msg in value if isinstance(value, list) else ():
                if isinstance(msg, dict):
                    keys.update(msg)
                    roles.update(v for v in msg.values() if isinstance(v, str) and len(v) <= 32)
    return fields, keys, roles


def check_columns(records: list, columns: dict, key: str = "data.columns") -> None:
    """Every name `data.columns` maps must be in the first records: else a UserError with "did you mean"."""
    if not columns or not records:
        return
    fields, keys, roles = _names(records)
    for ours, theirs in columns.items():
        where = (fields if ours in RECORD_FIELDS else set()) | (keys if ours in MESSAGE_FIELDS else set()) | (
            roles if ours in ROLE_VALUES else set())
        if theirs in where:
            continue
        close = difflib.get_close_matches(theirs, sorted(where), n=1)
        have = ", ".join(sorted(where)[:12]) or "none"
        raise UserError(format_error(f"{key}.{ours}", f"the first {len(records)} records have no {theirs!r}",
                                     theirs, (f"did you mean {close[0]!r}? " if close else "") + f"they have: {have}"))


def preflight(chunks: list[Chunk], settings: Settings, tokenizer, sample: int = SAMPLE,
              columns_key: str = "data.columns") -> dict:
    """The checks above on the first `sample` records of `chunks`; a UserError for any template problem.

    Returns what was checked: ``{"records", "end_of_turn", "later_turns", "history_as_inference", "rules"}``
    (rules: how the records' renders were read, template.RULES' names, for the log)."""
    # None when a probe conversation does not render: the records below say why
    eot = end_of_turn(tokenizer, settings.chat_template_kwargs)
    closers = {tokenizer.convert_tokens_to_ids(t) for t in control_tokens(tokenizer, tokenizer.chat_template)}
    records = _first(chunks, settings, sample)
    check_columns([r[3] for r in records if not isinstance(r[3], RecordError)], settings.columns, columns_key)
    checked, later, same, rules = len(records), 0, 0, set()
    for where, _line, _raw, record in records:
        if isinstance(record, RecordError):
            continue  # a bad line: the prepare policy's business
        try:
            turns, as_inference, applied = check_example(record, settings, tokenizer, closers)
        except RecordError as err:
            if err.reason in FATAL:
                raise _fail(err, where, checked) from None
            continue
        later += turns
        same += as_inference
        rules.update(applied)
    return {"records": checked, "end_of_turn": eot, "later_turns": later, "history_as_inference": same,
            "rules": sorted(rules)}
