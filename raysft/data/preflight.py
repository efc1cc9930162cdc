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
import re
from typing import Optional

from raysft.data.chunks import Settings, example_of, mask_error, render, selected
from raysft.data.reading import read_chunk
from raysft.data.records import MESSAGE_FIELDS, RECORD_FIELDS, ROLE_VALUES, RecordError
from raysft.data.sources import Chunk
from raysft.data.template import compiled, control_tokens, conversation, end_of_turn
from raysft.data.tokenize import IGNORE_INDEX, tokenize_rendered
from raysft.errors import UserError, format_error

SAMPLE = 64  # records: enough to see every shape a dataset's first chunk has, a fraction of a second
PER_FILE = 8  # at least this many of each file's first records: every file is looked at
FATAL = {"template_not_prefix_stable", "template_drops_content", "no_end_of_turn", "no_trained_tokens",
         "all_trained", "end_of_turn_untrained", "prompt_differs", "generation_blocks_differ", "reasoning_needs_kwarg"}
COUNTED = {"thinking_off"}  # fatal too, reported once with how many of the sample's records it concerns
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # what transformers looks for (return_assistant_tokens_mask)


def _inference_ids(tokenizer, messages: list, tools: Optional[list], kwargs: Optional[dict] = None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        sanitize_control_tokens=True, return_dict=False, **(kwargs or {}))
    return list(out)


def _fail(err: RecordError, where: str, checked: int) -> UserError:
    records = f"{checked} records" if checked != 1 else "record"
    return UserError(f"{err.at(where)} (found by the chat template check before training, on the first {records}; "
                     "it is the template or the tokenizer, not this record alone)")


def _first(chunks: list[Chunk], settings: Settings, sample: int) -> list:
    """The first records of every file (of its first chunk), each as (file, where, line, raw, record): `sample` over
    all of them, at least PER_FILE each."""
    firsts = list({c.source: c for c in reversed(chunks)}.values())[::-1]  # each file's first chunk, in order
    each = max(PER_FILE, sample // max(len(firsts), 1))
    out: list = []
    for chunk in firsts:
        for n, item in enumerate(read_chunk(chunk, settings.hf_split)):
            if n >= each:
                break
            out.append((chunk.source, *item))
    return out


# the shapes raysft reads, by their fields; and names datasets give those fields (for the nearest shape's fix)
SHAPES = {"messages": ("messages",), "conversations (ShareGPT)": ("conversations",),
          "chosen/rejected": ("chosen", "rejected"), "prompt/completion": ("prompt", "completion"),
          "instruction/output (Alpaca)": ("instruction", "output"), "text": ("text",)}
SYNONYMS = {"prompt": ("question", "query", "input", "context", "user", "request", "problem"),
            "completion": ("answer", "response", "output", "reply", "target", "solution", "assistant"),
            "messages": ("conversation", "dialog", "dialogue", "chat", "turns", "history"),
            "conversations": ("conversation", "dialog", "dialogue", "chat", "turns"),
            "instruction": ("instructions", "task", "question"), "output": ("response", "answer"),
            "text": ("content", "document", "body"), "chosen": ("preferred", "accepted", "winner"),
            "rejected": ("dispreferred", "loser")}


def nearest_shape(keys: list) -> tuple[str, dict]:
    """The shape whose fields the record's keys come closest to, and the data.columns mapping that would read it
    ({} when none is close)."""
    best, mapping = "", {}
    for shape, fields in SHAPES.items():
        found = {}
        for f in fields:
            lower = {str(k).lower(): k for k in keys if k not in found.values()}
            close = [lower[s] for s in SYNONYMS.get(f, ()) if s in lower] or [
                lower[c] for c in difflib.get_close_matches(f, list(lower), n=1, cutoff=0.75)]
            if close:
                found[f] = close[0]
        if len(found) == len(fields) and len(found) > len(mapping):
            best, mapping = shape, found
    return best, mapping


def _unknown_shape(source: str, record: dict, checked: int) -> UserError:
    keys = list(record)
    shape, mapping = nearest_shape(keys)
    names = ", ".join(map(repr, keys[:8])) or "none"
    fix = (f"the nearest shape raysft reads is {shape}: map your names onto it with data.columns: "
           "{" + ", ".join(f"{ours}: {theirs}" for ours, theirs in mapping.items()) + "}") if mapping else (
        "give records one of the shapes raysft reads (" + ", ".join(SHAPES) + "), or map your names onto one with "
        "data.columns")
    return UserError(f"{source}: none of its first {checked} records has a shape raysft reads (the first one's keys: "
                     f"{names}); fix: {fix}")


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
    if compiled(tokenizer)[0].search(str(messages) + str(example.tools)):
        return 0, 0, rendered.rules  # control-token syntax typed in the data: kept as text, unlike a plain render
    kwargs = {**(settings.chat_template_kwargs or {}), **(example.template_kwargs or {})}
    prompt = _inference_ids(tokenizer, messages[:start], example.tools, kwargs)
    if rendered.history_untrained and ids[: len(prompt)] != prompt:
        prompt = _first_trained_prompt(tokenizer, messages, start, example.tools, kwargs, ids, labels) or prompt
    masked_reasoning = not settings.train_on_reasoning and example.completion[0].get("reasoning_content") is not None
    starts = (labels[len(prompt): len(prompt) + 1] != [IGNORE_INDEX] or masked_reasoning  # masked reasoning first
              or rendered.history_untrained > 0  # the first turn re-rendered as history: context, untrained
              or example.completion[0].get("switched_off"))  # the first turn switched off by a training flag
    if ids[: len(prompt)] != prompt or not starts or set(labels[: len(prompt)]) - {IGNORE_INDEX}:
        at = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(ids), len(prompt)))
        raise RecordError("prompt_differs", f"the prompt's token ids differ from apply_chat_template(prompt, "
                                            f"add_generation_prompt=True) at token {at} (training "
                                            f"{ids[at:at + 5]}, inference {prompt[at:at + 5]}), or the trained part "
                                            "does not start right after it; fix: report this with the template")
    switched = any(m.get("switched_off") for m in example.completion)  # the template's blocks mark every turn
    if GENERATION.search(tokenizer.chat_template or "") and not masked_reasoning and not switched:
        check_generation_blocks(rendered, tokenizer, messages, example.tools, kwargs)
    later = same = 0
    for j in range(start + 1, len(messages)):
        if messages[j]["role"] != "assistant":
            continue
        later += 1
        history = _inference_ids(tokenizer, messages[:j], example.tools, kwargs)
        same += ids[: len(history)] == history
    return later, same, rendered.rules


def check_generation_blocks(rendered, tokenizer, messages: list, tools, kwargs) -> None:
    """A template with `{% generation %}` blocks says itself what the assistant writes (transformers'
    `return_assistant_tokens_mask`): from the first trained character on, the blocks and the prefix method must mark
    the same characters. Compared on characters, so that it holds for every tokenizer (transformers' token mask
    needs a fast one), and up to what the prefix method decides by design: whitespace after a turn; the generation
    prompt (given at inference, never trained, though blocks may hold its header or pre-fill: gpt-oss, Qwen3.6);
    under the rules "next header" the next header's token it trains and "conditional end" the end token it does not
    (the one a template writes only at the conversation's end). RecordError ``generation_blocks_differ`` otherwise."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def draw(msgs: list, generation: bool, masks: bool = False):
        out = render_jinja_template([msgs], tools=tools, chat_template=tokenizer.chat_template,
                                    return_assistant_tokens_mask=masks, add_generation_prompt=generation,
                                    **{**tokenizer.special_tokens_map, **(kwargs or {})})
        return out[0][0], out[1][0] if masks else None

    text, spans = draw(messages, False, masks=True)
    if text != "".join(seg.text for seg in rendered.segments):
        return  # rendered otherwise (history re-rendered): the prefix checks above hold it to apply_chat_template

    def marks(pairs) -> bytearray:
        out = bytearray(len(text))
        for a, b in pairs:
            out[a:b] = b"\x01" * (b - a)
        return out

    at, trained = 0, []
    for seg in rendered.segments:
        trained += [(at, at + len(seg.text))] if seg.trained else []
        at += len(seg.text)
    ours, theirs = marks(trained), marks(spans)
    prompts = []  # each assistant turn's generation prompt, where the final text holds it
    for j, message in enumerate(messages):
        if message["role"] == "assistant" and j:
            before, prompted = draw(messages[:j], False)[0], draw(messages[:j], True)[0]
            if prompted.startswith(before) and text.startswith(prompted[len(before):], len(before)):
                prompts.append((len(before), len(prompted)))
    given = marks(prompts)
    controls = [(m.start(), m.end()) for m in compiled(tokenizer)[0].finditer(text)]
    header = marks(controls if "next header" in rendered.rules else [])
    ending = marks([(a, b) for a, b in controls if "conditional end" in rendered.rules and a and ours[
        len(text[:a].rstrip()) - 1]])  # a token right after a trained one
    for i in range(max(ours.find(1), 0), len(text)):
        if ours[i] != theirs[i] and not text[i].isspace() and not (
                header[i] if ours[i] else given[i] or ending[i]):
            what = "the prefix method trains it, the blocks do not" if ours[i] else ("the blocks mark it, the "
                                                                                     "prefix method does not train it")
            raise RecordError("generation_blocks_differ", (
                f"the template's {{% generation %}} blocks and raysft's prefix rendering disagree on what is trained "
                f"at character {i}, {text[i: i + 24]!r} after {text[max(0, i - 24): i]!r}: {what}; fix: make the "
                "blocks hold what the assistant writes (its answer and the token that ends its turn) or remove them "
                "(raysft's mask does not need them), or use data.chat_template: chatml"))


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
    check_columns([r[4] for r in records if not isinstance(r[4], RecordError)], settings.columns, columns_key)
    checked, later, same, rules = len(records), 0, 0, set()
    counted: list = []  # (where, error) of the COUNTED reasons
    shapes: dict = {}  # file -> [records looked at, of no known shape, the first such record]
    for source, where, _line, _raw, record in records:
        seen = shapes.setdefault(source, [0, 0, None])
        seen[0] += 1
        if isinstance(record, RecordError):
            continue  # a bad line: the prepare policy's business
        try:
            if selected(record, settings) is None:
                continue  # left out by data.where: never trained
        except RecordError as err:
            if err.reason == "unfiltered_label":  # a config decision, before anything runs
                raise UserError(f"{err.at(where)} (found before training, in the first {checked} records)") from None
            continue
        try:
            turns, as_inference, applied = check_example(record, settings, tokenizer, closers)
        except RecordError as err:
            if err.reason in FATAL:
                raise _fail(err, where, checked) from None
            if err.reason in COUNTED:
                counted.append((where, err))
            if err.reason == "unknown_format":
                seen[1] += 1
                seen[2] = seen[2] or record
            continue
        later += turns
        same += as_inference
        rules.update(applied)
    for source, (looked, unknown, first) in shapes.items():
        if looked and unknown == looked:  # a whole file of a shape raysft does not read: before Ray starts
            raise _unknown_shape(source, first, looked)
    if counted:
        where, err = counted[0]
        many = f"{len(counted)} of the {checked} records checked are like it" if len(counted) > 1 else (
            f"it is the only one of the {checked} records checked")
        raise UserError(f"{err.at(where)} ({many}; found by the chat template check before training)")
    return {"records": checked, "end_of_turn": eot, "later_turns": later, "history_as_inference": same,
            "rules": sorted(rules)}
