"""`data.chat_template`: a model's own template (four family shapes, byte-level and BPE tokenizers), tool calls and
reasoning in both modes, the checks before training, and the exported tokenizer. Exact ids and masks throughout:
the ids are what `apply_chat_template` gives for the whole conversation, the prompt what it gives with the
generation prompt, and the trained tokens decode to each assistant turn's answer and end-of-turn token."""

from __future__ import annotations

import json
import os
import re

import pytest
import templates

from raysft.data.chatml import CHAT_TEMPLATE, IM_END, IM_START
from raysft.data.chunks import Settings, render
from raysft.data.parsing import parse_line
from raysft.data.preflight import preflight
from raysft.data.records import RecordError, split_record
from raysft.data.sources import plan
from raysft.data.template import RULES, conversation, end_of_turn
from raysft.data.tokenize import IGNORE_INDEX, tokenize_rendered
from raysft.errors import UserError

from helpers import write_jsonl

Q1, A1, Q2, A2 = "What is 2 + 2?", "2 + 2 = 4.", "Reverse the word 'apple'.", "'apple' reversed is 'elppa'."
SYSTEM = "Answer briefly."
RECORDS = [  # (record, the assistant answers its completion trains)
    ({"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]}, [A1]),
    ({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                   {"role": "assistant", "content": A1}]}, [A1]),
    ({"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},  # two trained turns
                   {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}, [A1, A2]),
    ({"chosen": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},  # history in the prompt
                 {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}],
      "rejected": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                   {"role": "user", "content": Q2}, {"role": "assistant", "content": "no"}]}, [A2]),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_RECORD = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny."}]}
REASONING = "The user asks for 2 + 2. That is 4."


def settings(chat_template="model", **kw) -> Settings:
    base = dict(max_seq_len=4096, packing=True, loss_on="completion", system_message=None,
                chat_template=chat_template, train_on_reasoning=True, on_bad_record="error", on_overlong="truncate",
                hf_split="train", eval_fraction=0.0)
    return Settings(**{**base, **kw})


def encode(record, tokenizer, s: Settings):
    return tokenize_rendered([render(record, s, tokenizer)], tokenizer, s.loss_on)[0]


def trained_runs(tokenizer, ids, labels) -> list[str]:
    """The trained tokens, each run of consecutive ones decoded."""
    runs, run = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def first_trained(labels) -> int:
    return next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)


def inference_ids(tokenizer, messages, generation=False, tools=None):
    return list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation,
                                              tokenize=True, return_dict=False))


@pytest.fixture(scope="module", params=[(f, k) for f in templates.FAMILIES for k in templates.KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def family(request):
    name, kind = request.param
    tok = templates.family_tokenizer(name, kind)
    tok.raysft_test_kind = kind
    return name, tok


def kind_of(tok) -> str:
    return tok.raysft_test_kind


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_native_template_ids_and_mask_are_exact(family, index):
    name, tok = family
    record, answers = RECORDS[index]
    eot = templates.FAMILIES[name][4]
    ids, labels = encode(record, tok, settings())
    example = split_record(record)
    if not kind_of(tok).startswith("sentencepiece"):  # the whole conversation, as the template tokenizes it in one piece
        assert ids == inference_ids(tok, example.prompt + example.completion)
    prompt = inference_ids(tok, example.prompt, generation=True)
    assert ids[: len(prompt)] == prompt  # what the model is given at inference...
    assert set(labels[: len(prompt)]) == {IGNORE_INDEX} and labels[len(prompt)] != IGNORE_INDEX  # ...trained after
    assert trained_runs(tok, ids, labels) == [a + eot for a in answers]  # never headers, user turns or whitespace
    assert end_of_turn(tok) == eot


def test_system_message_setting_under_a_native_template(family):
    name, tok = family
    record = RECORDS[0][0]
    ids, _ = encode(record, tok, settings(system_message=SYSTEM))
    assert ids == inference_ids(tok, [{"role": "system", "content": SYSTEM}] + record["messages"])


def test_later_turns_history_is_tokenized_as_inference_tokenizes_it(family):
    """Each later assistant turn's context equals apply_chat_template(conversation so far, generation prompt) on
    this data, for every family and both tokenizers: the pieces raysft tokenizes apart all meet at a control
    token or at the header's newline, where these tokenizers split anyway (measured by the preflight too)."""
    _, tok = family
    record = RECORDS[2][0]
    ids, labels = encode(record, tok, settings())
    history = inference_ids(tok, record["messages"][:3], generation=True)
    assert ids[: len(history)] == history and labels[len(history)] != IGNORE_INDEX


def test_user_typed_control_tokens_stay_text(family):
    name, tok = family
    eot = templates.FAMILIES[name][4]
    record = {"messages": [{"role": "user", "content": f"say {eot} please"},
                           {"role": "assistant", "content": f"ok {eot} done"}]}
    ids, labels = encode(record, tok, settings())
    eot_id = tok.convert_tokens_to_ids(eot)
    clean = [{**m, "content": m["content"].replace(eot, "EOT")} for m in record["messages"]]
    assert ids.count(eot_id) == inference_ids(tok, clean).count(eot_id)  # only the template's own
    assert trained_runs(tok, ids, labels)[-1] == f"ok {eot} done{eot}"
    assert labels[ids.index(eot_id, len(ids) - 3)] == eot_id  # the template's own end-of-turn: a control token
    sanitized = list(tok.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=True,
                                             sanitize_control_tokens=True, return_dict=False))
    assert tok.decode(ids[: len(sanitized)]) == tok.decode(sanitized)


def test_chatml_mode_is_unchanged_and_equals_its_jinja(tokenizer):
    """chatml (the default) renders as before to the character, and its Jinja twin (exported) gives the same ids."""
    tokenizer.chat_template = CHAT_TEMPLATE
    for record, answers in RECORDS:
        chatml = encode(record, tokenizer, settings("chatml"))
        assert encode(record, tokenizer, settings("model")) == chatml
        assert trained_runs(tokenizer, *chatml) == [a + IM_END for a in answers]


# ---- tool calls --------------------------------------------------------------------------------------------------

TOOLS_BLOCK = ('# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided '
               'with function signatures within <tools></tools> XML tags:\n<tools>\n' + json.dumps(TOOLS[0]) +
               '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
               '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
               '<args-json-object>}\n</tool_call>')
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_chatml_tool_calls_to_the_character(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    rendered = render(TOOL_RECORD, settings("chatml"), tokenizer)
    S, E = IM_START, IM_END
    assert rendered.text == (f"{S}system\n{TOOLS_BLOCK}{E}\n{S}user\nWeather in Paris?{E}\n{S}assistant\n"
                             f"{CALL_TEXT}{E}\n{S}tool\n18C, sunny{E}\n{S}assistant\nIt is 18C and sunny.{E}\n")
    ids, labels = tokenize_rendered([rendered], tokenizer)[0]
    assert trained_runs(tokenizer, ids, labels) == [CALL_TEXT + E, "It is 18C and sunny." + E]  # the result: not
    with_system = {**TOOL_RECORD, "messages": [{"role": "system", "content": SYSTEM}] + TOOL_RECORD["messages"]}
    assert render(with_system, settings("chatml"), tokenizer).text.startswith(f"{S}system\n{SYSTEM}\n\n{TOOLS_BLOCK}{E}")
    # content beside the call, two calls: newline-joined; the exported Jinja renders the same
    two = {"tools": TOOLS, "messages": [{"role": "user", "content": "Paris and Rome?"}, {
        "role": "assistant", "content": "Checking.", "tool_calls": [CALL, {"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome"}'}}]}]}
    text = render(two, settings("chatml"), tokenizer).completion
    assert text == f"Checking.\n{CALL_TEXT}\n{CALL_TEXT.replace('Paris', 'Rome')}{E}\n"
    for record in (TOOL_RECORD, with_system, two):
        assert encode(record, tokenizer, settings("model")) == encode(record, tokenizer, settings("chatml"))


@pytest.mark.parametrize("name", ["llama3", "qwen"])
@pytest.mark.parametrize("kind", list(templates.KINDS))
def test_native_tool_calls_are_passed_to_the_template_and_trained(name, kind):
    tok = templates.family_tokenizer(name, kind)
    eot = templates.FAMILIES[name][4]
    ids, labels = encode(TOOL_RECORD, tok, settings())
    messages = split_record(TOOL_RECORD).prompt + split_record(TOOL_RECORD).completion
    assert ids == inference_ids(tok, messages, tools=TOOLS)
    call = ('{"name": "get_weather", "parameters": {"city": "Paris"}}' if name == "llama3" else CALL_TEXT)
    assert trained_runs(tok, ids, labels) == [call + eot, "It is 18C and sunny." + eot]
    as_string = json.loads(json.dumps(TOOL_RECORD))
    as_string["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    assert encode(as_string, tok, settings()) == (ids, labels)  # arguments as a JSON string: the same tokens


def test_a_template_without_tool_support_is_refused_not_silently_dropped():
    tok = templates.byte_tokenizer(templates.NO_TOOLS, templates.BROKEN_SPECIALS)
    with pytest.raises(RecordError) as info:
        render(TOOL_RECORD, settings(), tok)
    assert info.value.reason == "template_drops_content"
    assert "messages[1]: the chat template does not render tool call 'get_weather' of this assistant turn" in str(
        info.value)


@pytest.mark.parametrize("arguments, message", [
    ('{"city": ', "messages[1].tool_calls[0].function.arguments: arguments are not valid JSON (got \"{\\\"city\\\": "
                  "\"); fix: give arguments as a JSON object or a string holding one"),
    ("[1]", 'messages[1].tool_calls[0].function.arguments: arguments must be a JSON object (got [1]); fix: '
            '{"arguments": {"city": "Paris"}}'),
])
def test_malformed_tool_arguments_are_a_bad_record(arguments, message):
    record = json.loads(json.dumps(TOOL_RECORD))
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = arguments
    with pytest.raises(RecordError) as info:
        split_record(record)
    assert (info.value.reason, info.value.message) == ("bad_tool_call", message)


def test_null_content_needs_tool_calls_and_empty_answers_are_refused():
    with pytest.raises(RecordError) as info:
        split_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]})
    assert info.value.message == ("messages[1]: message has a null 'content' (got {\"role\": \"assistant\", "
                                  "\"content\": null}); fix: every message needs 'role' and 'content' (null is "
                                  "allowed only beside tool_calls)")
    with pytest.raises(RecordError) as info:
        split_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]})
    assert info.value.reason == "empty_answer"


# ---- reasoning -----------------------------------------------------------------------------------------------------

THINK = f"<think>\n{REASONING}\n</think>\n\n"


@pytest.mark.parametrize("inline", [False, True], ids=["reasoning_content", "think-in-content"])
def test_chatml_reasoning_trained_or_masked(tokenizer, inline):
    tokenizer.chat_template = CHAT_TEMPLATE
    answer = {"role": "assistant", "content": f"<think>{REASONING}</think>\n{A1}"} if inline else \
        {"role": "assistant", "content": A1, "reasoning_content": REASONING}
    record = {"messages": [{"role": "user", "content": Q1}, answer]}
    rendered = render(record, settings("chatml"), tokenizer)
    assert rendered.completion == f"{THINK}{A1}{IM_END}\n"
    assert trained_runs(tokenizer, *tokenize_rendered([rendered], tokenizer)[0]) == [THINK + A1 + IM_END]
    masked = encode(record, tokenizer, settings("chatml", train_on_reasoning=False))
    assert trained_runs(tokenizer, *masked) == [A1 + IM_END]
    assert encode(record, tokenizer, settings("model", train_on_reasoning=False)) == masked  # the Jinja twin


@pytest.mark.parametrize("name", ["qwen", "llama3", "gemma"])  # qwen reads reasoning_content; the others get it inline
@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_native_reasoning_trained_or_masked(name, train_on_reasoning):
    tok = templates.family_tokenizer(name, "bpe")
    eot = templates.FAMILIES[name][4]
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    ids, labels = encode(record, tok, settings(train_on_reasoning=train_on_reasoning))
    runs = trained_runs(tok, ids, labels)
    if train_on_reasoning:
        assert runs == [THINK + A1 + eot]
    else:
        assert runs == [A1 + eot]
        assert REASONING in tok.decode(ids)  # masked, not dropped


def test_masked_reasoning_with_no_answer_is_refused(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": "", "reasoning_content": REASONING}]}
    for mode in ("chatml", "model"):
        with pytest.raises(RecordError) as info:
            render(record, settings(mode, train_on_reasoning=False), tokenizer)
        assert info.value.reason == "empty_answer"
    assert encode(record, tokenizer, settings("chatml"))  # trained on the reasoning, it is an answer
    empty_think = {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": "<think></think>"}]}
    with pytest.raises(RecordError) as info:
        split_record(empty_think)
    assert info.value.reason == "empty_answer"  # an empty think block is never the only trained content


# ---- duplicate keys ------------------------------------------------------------------------------------------------

def test_a_duplicated_key_is_a_bad_record():
    with pytest.raises(RecordError) as info:
        parse_line('{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}')
    assert (info.value.reason, info.value.message) == (
        "duplicate_key", "key 'role' appears twice in one object (JSON keeps only the last, so a value would be "
                         "lost); fix: give each key once")


@pytest.mark.parametrize("line, key", [
    ('{"a": 1, "a": 2}', "a"),
    ('{"a": "x:y", "b": {"c": "1:2", "c": {"d": 1}}}', "c"),  # colons in strings and a lost object
    ('{"k\\u003a": 1, "k:": 2}', "k:"),  # the same key, once written with an escaped colon
    ('{"l": [{"z": 1}, {"z": 1, "z": 1}]}', "z"),  # equal values: the lost one is still a key given twice
    ('{"x": [1, {"t": "a", "t": "a:b:c"}]}', "t"),
    ('{"a": 1, "a": "\\u003a"}', "a"),  # a lost colon made up by an escaped one: the counts alone would agree
])
def test_a_key_given_twice_is_found_at_any_depth(line, key):
    with pytest.raises(RecordError) as info:
        parse_line(line)
    assert info.value.reason == "duplicate_key" and f"key {key!r} appears twice" in info.value.message


@pytest.mark.parametrize("line", [
    '{"a": "x:y:z", "b": {"c": ":"}}', '{"k": "\\u003a", "m": {"x": 1}}', '{"k\\u003a": 1, "k": 2}',
    '{"a": 1, "b": {"a": 1}}', '{"n": NaN, "s": "\\ud800:"}',
])
def test_lines_without_a_repeated_key_parse_as_json_does(line):
    assert parse_line(line) == json.loads(line)


# ---- the checks before training ------------------------------------------------------------------------------------

def _preflight(tmp_path, tok, records, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    chunks, _ = plan([path], 1 << 20)
    return preflight(chunks, settings(**kw), tok), path


MULTI_REASONING = {"messages": [{"role": "user", "content": Q1},
                                {"role": "assistant", "content": A1, "reasoning_content": REASONING},
                                {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}


@pytest.mark.parametrize("template, records, message", [
    (templates.DROPS_ANSWERS, [RECORDS[0][0]],
     "train.jsonl:1: messages[1]: the chat template does not render its content of this assistant turn (rendered: "
     "\"<|im_end|>\"); fix: use a template that renders it (tool calls need a template with tool support), or "
     "data.chat_template: chatml"),
    (templates.NO_END_TOKEN, [RECORDS[0][0]],
     "train.jsonl:1: messages[1]: the chat template ends this assistant turn without a control token (it ends with "
     "\"2 + 2 = 4.\"), and no control token opens the next turn, so the model would never learn to stop; fix: add the template's end-of-turn token to the "
     "tokenizer as a special token, or use data.chat_template: chatml"),
    (templates.BLOCKS_SHORT, [RECORDS[0][0]],
     "train.jsonl:1: the template's {% generation %} blocks and raysft's prefix rendering disagree on what is "
     "trained at character 74, '<|im_end|>\\n' after 'rt|>assistant\\n2 + 2 = 4.': the prefix method trains it, the "
     "blocks do not; fix: make the blocks hold what the assistant writes (its answer and the token that ends its "
     "turn) or remove them (raysft's mask does not need them), or use data.chat_template: chatml"),
    (templates.ONLY_ANSWERS, [RECORDS[0][0]],
     "train.jsonl:1: every token is trained, the prompt too: the chat template's prompt rendered to nothing; fix: "
     "check data.chat_template renders user and system messages"),
])
def test_preflight_refuses_broken_templates(tmp_path, template, records, message):
    tok = templates.byte_tokenizer(template, [] if template == templates.NO_END_TOKEN else templates.BROKEN_SPECIALS)
    with pytest.raises(UserError) as info:
        _preflight(tmp_path, tok, records)
    where, _, rest = str(info.value).partition(": ")
    assert os.path.basename(where) + ": " + rest.split(" (found by the chat template check")[0] == message
    first = f"{len(records)} records" if len(records) > 1 else "record"
    assert f"(found by the chat template check before training, on the first {first};" in str(info.value)


def test_a_template_that_renders_history_otherwise_leaves_earlier_turns_untrained(tmp_path):
    """Qwen3's shape: reasoning rendered only after the last user turn. The earlier turn is context, rendered as
    inference renders the history (no reasoning), untrained; the last turn trained; the preflight reports it."""
    tok = templates.byte_tokenizer(templates.QWEN3_HISTORY, templates.BROKEN_SPECIALS)
    ids, labels = encode(MULTI_REASONING, tok, settings())
    history = inference_ids(tok, MULTI_REASONING["messages"][:3], generation=True)
    assert ids[: len(history)] == history and set(labels[: len(history)]) == {IGNORE_INDEX}
    assert trained_runs(tok, ids, labels) == [A2 + IM_END]
    rendered = render(MULTI_REASONING, settings(), tok)
    assert rendered.history_untrained == 1 and rendered.rules == ("history", "prefix")
    checked, _ = _preflight(tmp_path, tok, [MULTI_REASONING])
    assert checked["records"] == 1 and checked["end_of_turn"] == IM_END


def test_preflight_reports_what_it_checked(tmp_path, family):
    """The share of later turns whose history is tokenized as inference re-tokenizes it: all of them, except under
    a SentencePiece-style tokenizer when an earlier answer is glued to its header (`'apple'` after a newline or
    `[/INST]`): re-tokenized in one piece, the history merges across that seam, while training keeps the answer's
    tokens as generated after its prompt (one sequence cannot hold both)."""
    name, tok = family
    glued = {"messages": [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2},
                          {"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]}
    checked, _ = _preflight(tmp_path, tok, [r for r, _ in RECORDS] + [glued, {"messages": "bad"}])
    assert checked == {"records": 6, "end_of_turn": templates.FAMILIES[name][4], "later_turns": 2,
                       "history_as_inference": 1 if kind_of(tok).startswith("sentencepiece") else 2,
                       "rules": ["prefix"]}


# ---- export ---------------------------------------------------------------------------------------------------------

def test_exported_tokenizer_keeps_the_template_and_its_end_of_turn(tmp_path, family):
    """What export does to the tokenizer, for every family: the folder's apply_chat_template reproduces the
    training prompt, eos starts with the template's end-of-turn token, and generate's prompt is the same ids."""
    from transformers import AutoTokenizer

    from raysft.data.template import render_prompt
    from raysft.export import chat_ready

    name, tok = family
    eot = templates.FAMILIES[name][4]
    gen = chat_ready(tok, "model")
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert gen["eos_token_id"][0] == back.convert_tokens_to_ids(eot)
    for record, _ in RECORDS:
        example = split_record(record)
        ids, labels = encode(record, tok, settings())
        start = first_trained(labels)
        assert inference_ids(back, example.prompt, generation=True) == ids[:start]
        assert tokenize_rendered([render_prompt(example.prompt, back)], back)[0][0] == ids[:start]


@pytest.mark.ray
def test_training_with_a_models_template_exports_it_and_the_export_stops_by_itself(tmp_path, ray_session):
    """`data.chat_template: model:tool_use` with `data.chat_template_kwargs` end to end, on GLM-4's real template
    (turns closed by the next header): prepare picks the named template, checks it with the kwargs and says which
    rules it applied, the run trains (the next header's `<|user|>` among the trained tokens), and the exported folder
    carries that template alone, records the kwargs, renders the training prompt with them, has `<|user|>` as its
    first stop id, and the model trained on it stops there by itself: in `generate()` on the folder, in
    `raysft generate` and in the eval prompts' answers."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from raysft.config import load_config
    from raysft.data.template import render_prompt
    from raysft.export import exported_template_kwargs, generate
    from raysft.train.launch import train

    from helpers import ROOT, base_config, config_file

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from make_assets import tiny_llama_config

    specials, eos, _, header = REAL["glm4moe"]
    glm = trl_template("glm4moe")
    model_dir = tmp_path / "glm4-like"
    tok = templates.KINDS["bpe"](glm, specials, None, eos)
    tok.chat_template = {"default": templates.MISTRAL, "tool_use": glm}
    tok.save_pretrained(model_dir)
    tok.chat_template = glm
    tiny_llama_config(len(tok)).save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in RECORDS] * 8 + [TOOL_RECORD] * 4)
    kwargs = {"enable_thinking": False}
    cfg = base_config(tmp_path, str(model_dir), data, data={"chat_template": "model:tool_use", "max_seq_len": 512,
                                                            "chat_template_kwargs": kwargs},
                      train={"max_steps": 100, "zero_stage": 0, "lr": 3e-3, "eval_prompts": [Q1],
                             "eval_max_new_tokens": 40}, cluster={"num_workers": 1})
    logs = []
    result = train(None, [], cfg=load_config(config_file(tmp_path, cfg)), log=logs.append)
    assert any(line.startswith("prepare: chat template model:tool_use with {'enable_thinking': False} checked on 36 "
                               "records (masks, end of turn <|user|> trained, prompts as apply_chat_template gives "
                               "them; history of later turns as at inference: 12/12)\nprepare: template rule next "
                               f"header: {RULES['next header']}\nprepare: template rule prefix: {RULES['prefix']}")
               for line in logs), logs
    final = result["final"]
    back = AutoTokenizer.from_pretrained(final)
    stop = back.convert_tokens_to_ids(header)
    generation = GenerationConfig.from_pretrained(final)
    assert back.chat_template == glm and generation.eos_token_id[0] == stop
    assert exported_template_kwargs(final) == kwargs
    prompt = [{"role": "user", "content": Q1}]
    ids, labels = encode(RECORDS[0][0], tok, settings(chat_template_kwargs=kwargs))
    exported = list(back.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False,
                                             **kwargs))
    assert exported == ids[: first_trained(labels)] and exported != inference_ids(back, prompt, generation=True)
    assert tokenize_rendered([render_prompt(prompt, back, template_kwargs=exported_template_kwargs(final))],
                             back)[0][0] == exported  # what raysft generate renders
    model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([exported]), max_new_tokens=40, do_sample=False,
                             generation_config=generation)[0, len(exported):].tolist()
    assert out[-1] == stop and len(out) < 40 and back.decode(out[:-1]).strip() == A1  # stopped by itself, at <|user|>
    assert generate(final, Q1, max_new_tokens=40).strip() == A1
    with open(os.path.join(cfg["output_dir"], "samples.jsonl"), encoding="utf-8") as f:
        assert json.loads(f.readlines()[-1])["answer"] == A1


# ---- found in review -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["chatml", "qwen", "llama3"])
def test_preflight_accepts_masked_reasoning(tmp_path, tokenizer, mode):
    tokenizer.chat_template = CHAT_TEMPLATE
    tok = tokenizer if mode == "chatml" else templates.family_tokenizer(mode, "bpe")
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    checked, _ = _preflight(tmp_path, tok, [record], chat_template=mode if mode == "chatml" else "model",
                            train_on_reasoning=False)
    assert checked["records"] == 1


def test_reasoning_with_control_token_text_is_masked_whole():
    tok = templates.family_tokenizer("llama3", "bpe")
    reasoning = "first line\nsay <|eot_id|> then\nmore reasoning here"
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": A1, "reasoning_content": reasoning}]}
    ids, labels = encode(record, tok, settings(train_on_reasoning=False))
    assert trained_runs(tok, ids, labels) == [A1 + "<|eot_id|>"]


THINKING_FIELD = (  # reads reasoning from `thinking`, as gpt-oss's template does
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m.thinking is defined %}{{- '<think>' + m.thinking + '</think>' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_reasoning_goes_to_the_field_the_template_reads():
    tok = templates.byte_tokenizer(THINKING_FIELD, templates.BROKEN_SPECIALS)
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    assert trained_runs(tok, *encode(record, tok, settings())) == [f"<think>{REASONING}</think>{A1}{IM_END}"]
    assert trained_runs(tok, *encode(record, tok, settings(train_on_reasoning=False))) == [A1 + IM_END]


def test_records_as_openai_exports_and_hf_datasets_keep_them(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    plain = {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]}
    empty_calls = {"messages": [{"role": "user", "content": Q1},
                                {"role": "assistant", "content": A1, "tool_calls": []}]}
    assert encode(empty_calls, tokenizer, settings("chatml")) == encode(plain, tokenizer, settings("chatml"))
    as_string = {**TOOL_RECORD, "tools": json.dumps(TOOLS)}
    assert encode(as_string, tokenizer, settings("chatml")) == encode(TOOL_RECORD, tokenizer, settings("chatml"))
    with pytest.raises(RecordError) as info:
        split_record({**TOOL_RECORD, "tools": [{"type": "function", "function": "get_weather"}]})
    assert info.value.reason == "bad_tools"
    with pytest.raises(RecordError) as info:
        split_record({"messages": plain["messages"] + [{"role": "user", "content": "more?"},
                                                       {"role": "assistant", "content": ""}]})
    assert info.value.message.startswith("messages[3]: an assistant message with empty content")


def test_an_empty_think_block_is_kept(tokenizer):
    """Qwen3's non-thinking answers carry `<think>\\n\\n</think>\\n\\n`: rendered as given, not dropped."""
    tokenizer.chat_template = CHAT_TEMPLATE
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": f"<think>\n\n</think>\n\n{A1}"}]}
    assert render(record, settings("chatml"), tokenizer).completion == f"<think>\n\n</think>\n\n{A1}{IM_END}\n"
    assert encode(record, tokenizer, settings("model")) == encode(record, tokenizer, settings("chatml"))
    masked = encode(record, tokenizer, settings("chatml", train_on_reasoning=False))
    assert trained_runs(tokenizer, *masked) == [A1 + IM_END]


def test_export_keeps_the_base_models_stop_tokens():
    from raysft.export import chat_ready

    tok = templates.family_tokenizer("llama3", "bpe")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert chat_ready(tok, "model", base_eos=[eot, 7])["eos_token_id"] == [eot, 7] + (
        [tok.eos_token_id] if tok.eos_token_id not in (eot, 7) else [])


# ---- the tokenizer a prepare task loads ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(templates.KINDS))
def test_a_prepare_task_loads_the_drivers_tokenizer_class_without_torch(tmp_path, kind):
    """A task loads the saved tokenizer as the driver's own class: the same ids, specials and template as
    AutoTokenizer gives, without AutoTokenizer's import of torch (1.7 s of each Ray worker's first task)."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from raysft.data.prepared import saved_tokenizer, tokenizer_class, tokenizer_dir

    tok = templates.family_tokenizer("llama3", kind)
    tok.save_pretrained(tokenizer_dir(str(tmp_path)))
    path = tokenizer_class(tok)
    assert path == f"{type(tok).__module__}:{type(tok).__qualname__}" and path.startswith("transformers.")
    task_side, auto = saved_tokenizer(str(tmp_path), path), AutoTokenizer.from_pretrained(tokenizer_dir(str(tmp_path)))
    assert type(task_side) is type(auto)
    assert (task_side.get_vocab(), task_side.all_special_tokens, task_side.chat_template) == (
        auto.get_vocab(), auto.all_special_tokens, auto.chat_template)
    text = "<|start_header_id|>user\n  Two words,\tthen more: 2 + 2?<|eot_id|>"
    assert task_side(text)["input_ids"] == auto(text)["input_ids"] == tok(text)["input_ids"]
    code = ("import sys; from raysft.data.prepared import saved_tokenizer; "
            f"t = saved_tokenizer({str(tmp_path)!r}, {path!r}); t('x'); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ---- real templates (TRL's installed copies of the models' own): pre-fill, conditional end, next header -------------

def trl_template(name: str) -> str:
    import trl

    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


R1_SPECIALS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜end▁of▁sentence｜>"]
REAL = {  # name: (specials, eos, the rule, what ends a trained turn)
    "deepseek_r1_distill": (R1_SPECIALS, "<｜end▁of▁sentence｜>", "open think", "<｜end▁of▁sentence｜>"),
    "phi3_5": (["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>", "conditional end", "<|end|>"),
    "glm4moe": (["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "<think>",
                 "</think>"], "<|endoftext|>", "next header", "<|user|>"),
}


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_templates_prefill_conditional_end_and_next_header(name, kind):
    """The prompt is apply_chat_template(prompt, add_generation_prompt=True) exactly (R1's `<think>\\n` pre-fill in
    it, untrained); the trained run is what the model writes after it, up to the token that ends the turn (R1: the
    empty reasoning closed, then the answer and eos; Phi-3.5: `<|end|>`, not the eos it writes only at the end of a
    conversation; GLM-4: the next header's `<|user|>`), which is the end-of-turn token generation stops at."""
    specials, eos, rule, end = REAL[name]
    tok = templates.KINDS[kind](trl_template(name), specials, None, eos)
    record = RECORDS[0][0]
    ids, labels = encode(record, tok, settings())
    prompt = inference_ids(tok, record["messages"][:1], generation=True)
    assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}
    runs = trained_runs(tok, ids, labels)
    expected = {"deepseek_r1_distill": "\n</think>\n\n" + A1 + end, "phi3_5": A1 + end,
                "glm4moe": "\n<think></think>\n" + A1 + end}[name]
    if kind == "byte":
        assert runs == [expected]
    else:  # SentencePiece marks word starts: the decoded run has the same words, control tokens and ending
        def bare(text):
            return text.replace(" ", "").replace("\u2581", "")

        assert bare(runs[0]).endswith(bare(A1 + end)) and len(runs) == 1
    assert rule in render(record, settings(), tok).rules
    assert end_of_turn(tok) == end
    assert templates_stop_first(tok) == tok.convert_tokens_to_ids(end)


def templates_stop_first(tok) -> int:
    from raysft.data.template import stop_ids

    return stop_ids(tok)[0]


@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_deepseek_r1_prefill_trains_the_reasoning_after_the_prompts_think(train_on_reasoning):
    """DeepSeek-R1 (distills): the prompt ends with the pre-filled `<think>\\n`; the reasoning, `</think>`, the answer
    and eos follow it, the reasoning untrained under data.train_on_reasoning: false; in a later turn the earlier one
    is history as the template renders it (reasoning stripped), untrained."""
    tok = templates.byte_tokenizer(trl_template("deepseek_r1_distill"), R1_SPECIALS, None, "<｜end▁of▁sentence｜>")
    eos = "<｜end▁of▁sentence｜>"
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    ids, labels = encode(record, tok, settings(train_on_reasoning=train_on_reasoning))
    prompt = inference_ids(tok, record["messages"][:1], generation=True)
    assert tok.decode(prompt[-3:]).endswith("<｜Assistant｜><think>\n") and ids[: len(prompt)] == prompt
    assert tok.decode(ids[len(prompt):]) == REASONING + "\n</think>\n\n" + A1 + eos
    assert trained_runs(tok, ids, labels) == ([REASONING + "\n</think>\n\n" + A1 + eos] if train_on_reasoning
                                              else [A1 + eos])
    multi = {"messages": MULTI_REASONING["messages"]}
    ids, labels = encode(multi, tok, settings())
    native, _ = conversation(split_record(multi), tok)  # the earlier reasoning as a think block: the template strips it
    history = inference_ids(tok, native[:3], generation=True)
    assert ids[: len(history)] == history and set(labels[: len(history)]) == {IGNORE_INDEX}
    assert trained_runs(tok, ids, labels) == ["\n</think>\n\n" + A2 + eos]
    assert render(multi, settings(), tok).history_untrained == 1


# ---- named templates and template kwargs ---------------------------------------------------------------------------

QWEN3_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]


@pytest.mark.parametrize("thinking", [None, True, False])
def test_template_kwargs_reach_every_render(tmp_path, thinking):
    """data.chat_template_kwargs on Qwen3's real template: the prompt is apply_chat_template(prompt,
    add_generation_prompt=True, enable_thinking=...) exactly (false: the empty think block pre-filled, untrained;
    true or unset: written by the turn, trained), the preflight and the eval prompts render with them, and a turn with
    reasoning under enable_thinking: false is refused with the kwarg named."""
    from raysft.data.template import render_prompt, stop_ids

    tok = templates.byte_tokenizer(trl_template("qwen3"), QWEN3_SPECIALS, None, "<|im_end|>")
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    record = RECORDS[0][0]
    ids, labels = encode(record, tok, settings(chat_template_kwargs=kwargs))
    prompt = list(tok.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=True,
                                          return_dict=False, **kwargs))
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if thinking is False
                                                                     else ""))
    assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}
    assert trained_runs(tok, ids, labels) == [("" if thinking is False else "<think>\n\n</think>\n\n") + A1
                                              + "<|im_end|>"]
    prompted = render_prompt(record["messages"][:1], tok, template_kwargs=kwargs)
    assert tokenize_rendered([prompted], tok)[0][0] == prompt
    assert stop_ids(tok, template_kwargs=kwargs)[0] == tok.convert_tokens_to_ids("<|im_end|>")
    checked, _ = _preflight(tmp_path, tok, [r for r, _ in RECORDS], chat_template_kwargs=kwargs)
    assert checked == {"records": 4, "end_of_turn": "<|im_end|>", "later_turns": 1, "history_as_inference": 1,
                       "rules": ["history", "prefix"]}  # the two-turn record: its first turn is history
    multi = RECORDS[2][0]
    ids, labels = encode(multi, tok, settings(chat_template_kwargs=kwargs))
    later = list(tok.apply_chat_template(multi["messages"][:3], add_generation_prompt=True, tokenize=True,
                                         return_dict=False, **kwargs))
    assert ids[: len(later)] == later and set(labels[: len(later)]) == {IGNORE_INDEX}
    assert trained_runs(tok, ids, labels) == [("" if thinking is False else "<think>\n\n</think>\n\n") + A2
                                              + "<|im_end|>"]
    thought = {"messages": [{"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    if thinking is False:
        with pytest.raises(RecordError, match=r"this turn has reasoning, but the chat template's generation prompt "
                                              r"under data\.chat_template_kwargs \{enable_thinking: false\} "
                                              r"pre-fills .*; fix: set data\.chat_template_kwargs: "
                                              r"\{enable_thinking: true\}"):
            encode(thought, tok, settings(chat_template_kwargs=kwargs))
    else:
        ids, labels = encode(thought, tok, settings(chat_template_kwargs=kwargs))
        assert trained_runs(tok, ids, labels) == [f"<think>\n{REASONING}\n</think>\n\n{A1}<|im_end|>"]


NAMED = {"default": templates.QWEN, "tool_use": templates.LLAMA3}


@pytest.mark.parametrize("chosen, expected", [("model", "default"), ("model:default", "default"),
                                              ("model:tool_use", "tool_use")])
def test_named_templates_pick_one_and_train_with_it_alone(tmp_path, chosen, expected):
    """A tokenizer with named templates (additional_chat_templates/, as transformers saves a dict): `model` is its
    default one, `model:NAME` the one named; the tokenizer then carries that template alone, so apply_chat_template
    (also with tools, where transformers would otherwise switch to tool_use) renders what trains."""
    from transformers import AutoTokenizer

    from raysft.data.tokenize import load_tokenizer

    specials = sorted(set(templates.FAMILIES["qwen"][1]) | set(templates.FAMILIES["llama3"][1]))
    tok = templates.byte_tokenizer(NAMED["default"], specials, "<|begin_of_text|>", "<|im_end|>")
    tok.chat_template = dict(NAMED)
    tok.save_pretrained(tmp_path / "tok")
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template, dict)
    loaded = load_tokenizer(str(tmp_path / "tok"), chat_template=chosen)
    assert loaded.chat_template == NAMED[expected]
    ids, labels = encode(TOOL_RECORD, loaded, settings(chat_template=chosen))
    assert ids == inference_ids(loaded, TOOL_RECORD["messages"], tools=TOOLS)
    assert inference_ids(loaded, TOOL_RECORD["messages"][:1], generation=True, tools=TOOLS) == ids[
        : first_trained(labels)]


@pytest.mark.parametrize("names, chosen, message", [
    (["default", "tool_use"], "model:rag", "data.chat_template: the tokenizer has no chat template named 'rag' (got "
                                           "'model:rag'). fix: use one it has: model:default, model:tool_use"),
    (["rag", "tool_use"], "model", "data.chat_template: the tokenizer has named chat templates and none is called "
                                   "default (got '{path}'). fix: name the one to train with: model:rag, model:tool_use"),
    ([], "model:tool_use", "data.chat_template: the tokenizer has no chat template named 'tool_use' (it has one "
                           "template, unnamed) (got 'model:tool_use'). fix: use data.chat_template: model"),
])
def test_a_template_name_the_tokenizer_lacks_lists_the_names_it_has(tmp_path, names, chosen, message):
    from raysft.data.tokenize import load_tokenizer

    tok = templates.byte_tokenizer(templates.QWEN, templates.FAMILIES["qwen"][1])
    if names:
        tok.chat_template = {name: templates.QWEN for name in names}
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError) as err:
        load_tokenizer(str(tmp_path / "tok"), chat_template=chosen)
    assert str(err.value) == message.format(path=tmp_path / "tok")


# ---- every chat template TRL installs: the preflight (exact prompt ids, masks, {% generation %} blocks) ------------

CONTROL = re.compile(r"<\|[^|<>\s'\"]+\|>|<｜[^｜]+｜>|<\|[a-z_]+>|<[a-z_]+\|>|</?(?:think|start_of_turn|end_of_turn|bos|sop)>"
                     r"|\[gMASK\]|\[/?INST\]")  # a template's control tokens, as its tokenizer has them special
VISION = ("idefics3", "smolvlm", "llava_next")  # content as a list of image and text parts: not text SFT
EOS = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<turn|>", "<｜end▁of▁sentence｜>", "<|endoftext|>",
       "<|return|>", "<|END_OF_TURN_TOKEN|>", "<|eot|>", "<|end|>"]
BOS = ["<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>", "<|startoftext|>", "<BOS_TOKEN>"]
NO_TOOL_CALLS = {  # templates that render no tool calls (or no tools): the tool record is refused, not trained blind
    "cohere", "cohere2", "deepseek_r1_distill", "gemma", "gemma3", "lfm2", "llama3", "phi3", "phi3_5", "qwen2_5_vl"}
REFUSED = {  # (template, record): why; the rest accepted
    **{(n, "tools"): "does not render tool call" for b in NO_TOOL_CALLS for n in (b, b + "_training")},
    ("deepseekv3_training", "tools"): "does not render the record's tools in the prompt",
    ("diffusion_gemma_training", "tools"): r"\{% generation %\} blocks and raysft's prefix rendering disagree .*"
                                           r"<tool_call\|>.*: the prefix method trains it, the blocks do not",
    ("qwen3_5_nothink", "reasoning"): r"pre-fills .*thinking off",  # an empty think block where the reasoning goes
    ("qwen3_5_nothink_training", "reasoning"): r"pre-fills .*thinking off",
    ("qwen3:no_think", "reasoning"): "enable_thinking: false pre-fills an empty think block",
    ("qwen3_8:no_think", "reasoning"): "enable_thinking: false pre-fills an empty think block",
    **{(n, "reasoning"): "does not render its reasoning" for n in ("gemma4", "gemma4_v3", "gemma4_v4")},  # a
    # thinking channel only for tool-call turns: the `reasoning` field it reads is dropped from a plain answer
    ("apriel", "tools"): "does not render tool call",  # no tool support in Apriel's template
    ("phi4", "tools"): "does not render tool call",
    ("smollm3", "tools"): "does not render tool call",  # the shape here has no tools (SmolLM3's own: XML tools)
    ("smollm3_no_think", "tools"): "does not render tool call",
}


def trl_names() -> list[str]:
    import trl

    found = sorted(os.listdir(os.path.join(os.path.dirname(trl.__file__), "chat_templates")))
    return [n[:-6] for n in found if n.endswith(".jinja") and not n.startswith(VISION)]


def template_case(name: str):
    """(template, specials, bos, eos, kwargs) of TRL's installed template `name`, or of a shape written in
    templates.SHAPES; `NAME:no_think`: with enable_thinking false."""
    name, _, mode = name.partition(":")
    if name in templates.SHAPES:
        return templates.SHAPES[name]
    text = trl_template(name)
    specials = sorted(set(CONTROL.findall(text)))
    eos = next((t for t in EOS if t in specials), "</s>")
    bos = next((t for t in BOS if t in specials or t in text), "<s>" if "bos_token" in text else None)
    kwargs = {"enable_thinking": False} if mode == "no_think" else {}
    return text, sorted(set(specials) | {eos} | ({bos} if bos else set())), bos, eos, kwargs


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
@pytest.mark.parametrize("name", trl_names() + ["qwen3:no_think", "qwen3_8:no_think"] + sorted(templates.SHAPES))
def test_every_installed_template_is_accepted_exact_or_refused_with_the_reason(tmp_path, name, kind):
    """Each of TRL's installed chat templates (the models' own and TRL's `_training` copies with `{% generation %}`
    blocks; Qwen3 with enable_thinking both ways) and the shapes no package ships (Phi-4, Mistral v0.3 with tools,
    SmolLM3 both modes, Granite): the preflight passes on plain, system, multi-turn, history, tool and reasoning
    records (prompt ids exactly apply_chat_template's, the end of turn trained, and where the template has
    generation blocks, their mask equal to the prefix method's), or refuses the record kind the template cannot
    render, naming why."""
    text, specials, bos, eos, kwargs = template_case(name)
    tok = templates.KINDS[kind](text, specials, bos, eos)
    plain_records = [r for r, _ in RECORDS]
    checked, _ = _preflight(tmp_path / "plain", tok, plain_records, chat_template_kwargs=kwargs)
    assert checked["records"] == 4 and checked["later_turns"] >= 1 and checked["end_of_turn"] is not None
    assert checked["history_as_inference"] == checked["later_turns"]
    ids, labels = encode(RECORDS[0][0], tok, settings())
    def bare(text):  # SentencePiece decodes word starts as spaces
        return text.replace(" ", "").replace("\u2581", "")

    runs = [bare(run) for run in trained_runs(tok, ids, labels)]
    assert bare(A1) in runs[-1] and runs[-1].endswith(bare(checked["end_of_turn"]))
    for shape, record in (("tools", TOOL_RECORD), ("reasoning", MULTI_REASONING)):
        if (name, shape) in REFUSED:
            with pytest.raises(UserError, match=REFUSED[name, shape]):
                _preflight(tmp_path / shape, tok, [record], chat_template_kwargs=kwargs)
        else:
            assert _preflight(tmp_path / shape, tok, [record], chat_template_kwargs=kwargs)[0][
                "end_of_turn"] == checked["end_of_turn"]


def test_template_kwargs_are_read_from_the_config_and_in_the_prepared_fingerprint():
    """data.chat_template_kwargs reach the rows' settings (Settings.from_config) and so the fingerprint: a prepared
    dataset made with other kwargs is never reused."""
    from raysft.config.schema import DataConfig
    from raysft.data.prepared import fingerprint

    def of(kwargs):
        return Settings.from_config(DataConfig(chat_template="model", chat_template_kwargs=kwargs))

    assert of({"enable_thinking": False}).chat_template_kwargs == {"enable_thinking": False}
    prints = {fingerprint({}, of(kwargs).as_dict(), "tok") for kwargs in ({}, {"enable_thinking": False},
                                                                           {"enable_thinking": True})}
    assert len(prints) == 3


# ---- data.chat_template: auto ----------------------------------------------------------------------------------------

def test_auto_is_the_tokenizers_own_template_when_it_has_one_else_chatml(tmp_path):
    """auto resolves once, on the driver, into the config: `model` for a tokenizer with its own template (the
    prepared rows then equal model's), `chatml` for one without; an explicit choice is left alone."""
    from raysft.config import load_config
    from raysft.prepare import resolve_chat_template

    with_own = templates.byte_tokenizer(templates.QWEN, templates.FAMILIES["qwen"][1], None, "<|im_end|>")
    with_own.save_pretrained(tmp_path / "own")
    without = templates.byte_tokenizer(templates.QWEN, templates.FAMILIES["qwen"][1], None, "<|im_end|>")
    without.chat_template = None
    without.save_pretrained(tmp_path / "none")
    for folder, expected in (("own", "model"), ("none", "chatml")):
        cfg = load_config(None, [f"model.name_or_path={tmp_path / folder}", "data.train_files=[x.jsonl]",
                                 f"output_dir={tmp_path / 'run'}"])
        assert cfg.data.chat_template == "auto"
        raw = resolve_chat_template(cfg)
        assert cfg.data.chat_template == expected and raw is not None
        assert resolve_chat_template(cfg) is None and cfg.data.chat_template == expected  # once
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'own'}", "data.train_files=[x.jsonl]", f"output_dir={tmp_path}",
                             "data.chat_template=chatml"])
    assert resolve_chat_template(cfg) is None and cfg.data.chat_template == "chatml"


def test_a_model_template_refused_under_auto_says_chatml_is_the_way_out(tmp_path):
    """auto never falls back silently: a template the preflight refuses is the usual error, with what auto chose
    and the explicit fix; before Ray (prepare never asks for it)."""
    from raysft.config import load_config
    from raysft.prepare import prepare

    tok = templates.byte_tokenizer(templates.NO_END_TOKEN, [], None, "</s>")
    tok.save_pretrained(tmp_path / "tok")
    data = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in RECORDS])
    asked = []
    with pytest.raises(UserError) as err:
        prepare(load_config(_config(tmp_path, tmp_path / "tok", data)), log=lambda line: None,
                start_ray=lambda: asked.append("ray"))
    assert "ends this assistant turn without a control token" in str(err.value) and asked == []
    assert str(err.value).endswith("(data.chat_template: auto chose the tokenizer's own chat template; to train in "
                                   "raysft's ChatML instead, set data.chat_template: chatml)")


def _config(tmp_path, model, data) -> str:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "data": {"train_files": str(data)},
                                    "model": {"name_or_path": str(model), "from_scratch": True}}))
    return str(path)


def test_a_records_own_chat_template_kwargs_are_honoured_as_trl_honours_them(tmp_path):
    """Mixed thinking and non-thinking data on Qwen3's real template: a record's `chat_template_kwargs` are merged
    over data.chat_template_kwargs for its renders and its preflight (prompt ids exactly apply_chat_template with
    them); the preflight passes on the mix; under chatml the field is a bad record, and so is a malformed one."""
    tok = templates.byte_tokenizer(trl_template("qwen3"), QWEN3_SPECIALS, None, "<|im_end|>")
    plain_turn = {**RECORDS[0][0], "chat_template_kwargs": {"enable_thinking": False}}
    thought = {"messages": [{"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    ids, labels = encode(plain_turn, tok, settings())
    prompt = list(tok.apply_chat_template(plain_turn["messages"][:1], add_generation_prompt=True, tokenize=True,
                                          return_dict=False, enable_thinking=False))
    assert tok.decode(prompt).endswith("<think>\n\n</think>\n\n")
    assert ids[: len(prompt)] == prompt and trained_runs(tok, ids, labels) == [A1 + "<|im_end|>"]
    ids, labels = encode(thought, tok, settings())
    assert trained_runs(tok, ids, labels) == [f"<think>\n{REASONING}\n</think>\n\n{A1}<|im_end|>"]
    checked, _ = _preflight(tmp_path, tok, [plain_turn, thought])
    assert checked["records"] == 2
    with pytest.raises(RecordError, match="chat_template_kwargs: variables for a model's own template, and "
                                          "data.chat_template is chatml"):
        encode(plain_turn, tok, settings(chat_template="chatml"))
    with pytest.raises(RecordError, match="chat_template_kwargs: must map template variable names to values"):
        split_record({**RECORDS[0][0], "chat_template_kwargs": ["enable_thinking"]})


def test_thinking_off_with_reasoning_in_the_data_is_one_error_with_the_count(tmp_path):
    """Qwen3 under enable_thinking: false, on data where some records carry reasoning: one error before training,
    naming the first such record, how many of the checked records are like it, and the variable that fixes it."""
    tok = templates.byte_tokenizer(trl_template("qwen3"), QWEN3_SPECIALS, None, "<|im_end|>")
    thought = {"messages": [{"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1, "reasoning_content": REASONING}]}
    records = [RECORDS[0][0], thought, RECORDS[1][0], thought, thought]
    with pytest.raises(UserError) as err:
        _preflight(tmp_path, tok, records, chat_template_kwargs={"enable_thinking": False})
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'train.jsonl'}:2: messages[1]: this turn has reasoning")
    assert "fix: set data.chat_template_kwargs: {enable_thinking: true}" in text
    assert text.endswith("(3 of the 5 records checked are like it; found by the chat template check before training)")
