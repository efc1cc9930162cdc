"""Data as people keep it (issue 13, part 1): Alpaca records, `data.columns` for a dataset's own schema, and the
EOS token that ends plain text (trained, so a model learns to stop)."""

from __future__ import annotations

import json
import os

import pytest

from raysft.data.chatml import CHAT_TEMPLATE, IM_END, IM_START
from raysft.data.chunks import Settings, render
from raysft.data.preflight import check_columns, nearest_shape, preflight
from raysft.data.records import RecordError, split_record
from raysft.data.sources import plan
from raysft.data.tokenize import tokenize_rendered
from raysft.errors import UserError

from helpers import write_jsonl

S, E = IM_START, IM_END


def settings(**kw) -> Settings:
    base = dict(max_seq_len=4096, packing=True, loss_on="completion", system_message=None, on_bad_record="error",
                on_overlong="truncate", hf_split="train", eval_fraction=0.0)
    return Settings(**{**base, **kw})


def encode(record, tokenizer, s=None):
    return tokenize_rendered([render(record, s or settings(), tokenizer)], tokenizer)[0]


def test_alpaca_records_are_a_user_turn_and_an_answer(tokenizer):
    full = {"instruction": "Add the numbers.", "input": "2, 2", "output": "4", "system": "Be brief."}
    assert render(full, settings(), tokenizer).text == (f"{S}system\nBe brief.{E}\n{S}user\nAdd the numbers.\n\n2, 2"
                                                        f"{E}\n{S}assistant\n4{E}\n")
    bare = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    assert render(bare, settings(), tokenizer).text == f"{S}user\nSay hi.{E}\n{S}assistant\nHi!{E}\n"
    assert encode(bare, tokenizer) == encode({"messages": [{"role": "user", "content": "Say hi."},
                                                           {"role": "assistant", "content": "Hi!"}]}, tokenizer)


@pytest.mark.parametrize("record, reason, message", [
    ({"instruction": "x"}, "missing_field", "Alpaca record has no 'output'; fix: give 'instruction' and 'output' "
                                            "(and optionally 'input', 'system')"),
    ({"instruction": "x", "output": 3}, "bad_type", "output: must be a string (got 3)"),
    ({"instruction": "x", "output": ""}, "no_completion", "output: empty; fix: give the answer to train on"),
])
def test_bad_alpaca_records(record, reason, message):
    with pytest.raises(RecordError) as info:
        split_record(record)
    assert (info.value.reason, info.value.message) == (reason, message)


COLUMNS = {"messages": "conversation", "role": "speaker", "content": "text", "user": "human", "assistant": "bot"}


def test_columns_read_a_dataset_with_its_own_schema(tokenizer):
    theirs = {"conversation": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}], "id": 7}
    ours = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert encode(theirs, tokenizer, settings(columns=COLUMNS)) == encode(ours, tokenizer)
    alpaca = {"question": "Say hi.", "answer": "Hi!"}
    mapped = settings(columns={"instruction": "question", "output": "answer"})
    assert encode(alpaca, tokenizer, mapped) == encode({"instruction": "Say hi.", "output": "Hi!"}, tokenizer)


def test_a_mapping_to_a_missing_column_says_what_the_records_have(tmp_path, tokenizer):
    records = [{"conversations": [{"speaker": "human", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}] * 3
    with pytest.raises(UserError) as info:
        check_columns(records, {**COLUMNS, "messages": "conversation"})
    assert str(info.value) == ("data.columns.messages: the first 3 records have no 'conversation' (got "
                               "'conversation'). fix: did you mean 'conversations'? they have: conversations")
    with pytest.raises(UserError) as info:
        check_columns(records, {"messages": "conversations", "role": "speaker", "content": "text", "user": "humans"})
    assert str(info.value) == ("data.columns.user: the first 3 records have no 'humans' (got 'humans'). fix: did you "
                               "mean 'human'? they have: Hello, Hi, bot, human")
    path = write_jsonl(tmp_path / "d.jsonl", records)  # the same check runs in the preflight, before Ray
    tokenizer.chat_template = CHAT_TEMPLATE  # as load_tokenizer sets it under chatml
    with pytest.raises(UserError, match="data.columns.messages: the first 3 records have no 'conversation'"):
        preflight(plan([path], 1 << 20)[0], settings(columns=COLUMNS), tokenizer)


@pytest.mark.parametrize("record", [
    {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
    {"chosen": "Q: hi A: hello there", "rejected": "Q: hi A: go away"},
    {"text": "plain text, trained in full"},
], ids=["prompt-completion", "string-pair", "text"])
def test_plain_text_ends_with_a_trained_eos(tokenizer, record):
    ids, labels = encode(record, tokenizer)
    eos = tokenizer.eos_token_id
    assert ids[-1] == eos and labels[-1] == eos  # the last trained label: EOS, as TRL appends it
    assert [i for i in ids if i == eos] == [eos]
    without = tokenize_rendered([render(record, settings(), tokenizer)], tokenizer)[0][0][:-1]
    assert tokenizer.decode(without) == (record.get("text") or record.get("prompt", "Q: hi A:") +
                                         record.get("completion", " hello there"))
    # chat records end with their template's end-of-turn token, and get no EOS
    chat, _ = encode({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                     tokenizer)
    assert eos not in chat


def test_plain_text_already_ending_with_eos_gets_no_second_one():
    from make_assets import make_tokenizer

    tok = make_tokenizer()
    tok.eos_token = E  # as Qwen's tokenizers have it
    ids, labels = encode({"text": f"{S}user\nx{E}\n{S}assistant\ny{E}"}, tok)
    im_end = tok.convert_tokens_to_ids(E)
    assert ids.count(im_end) == 2 and ids[-1] == labels[-1] == im_end
    ids, labels = encode({"text": "no end"}, tok)
    assert ids[-1] == labels[-1] == im_end


# ---- datasets as they are published (issue 39): fixtures written from each convention's public description ---------

ASK, ANSWER, WRONG = "What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."
OPENAI_FORM = {"messages": [{"role": "user", "content": ASK}, {"role": "assistant", "content": ANSWER}]}


@pytest.mark.parametrize("record", [
    # LLaMA-Factory's data/README.md, "Sharegpt Format / Preference Dataset": conversations, then one message each
    {"conversations": [{"from": "human", "value": ASK}], "chosen": {"from": "gpt", "value": ANSWER},
     "rejected": {"from": "gpt", "value": WRONG}},
    # the same with lists, and with OpenAI keys beside a `messages` prompt
    {"conversations": [{"from": "human", "value": ASK}], "chosen": [{"from": "gpt", "value": ANSWER}],
     "rejected": [{"from": "gpt", "value": WRONG}]},
    {"messages": [{"role": "user", "content": ASK}], "chosen": {"role": "assistant", "content": ANSWER},
     "rejected": {"role": "assistant", "content": WRONG}},
], ids=["sharegpt-objects", "sharegpt-lists", "openai-objects"])
def test_sharegpt_preference_pairs_train_the_conversation_and_chosen(tokenizer, record):
    assert encode(record, tokenizer) == encode(OPENAI_FORM, tokenizer)
    multi = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                               {"from": "human", "value": ASK}],
             "chosen": {"from": "gpt", "value": ANSWER}, "rejected": {"from": "gpt", "value": WRONG}}
    example = split_record(multi)
    assert [m["content"] for m in example.prompt] == ["Hi", "Hello", ASK]
    assert example.completion == [{"role": "assistant", "content": ANSWER}]
    with pytest.raises(RecordError, match="preference record has 'conversations' but no 'rejected'"):
        split_record({k: v for k, v in multi.items() if k != "rejected"})
    with pytest.raises(RecordError, match="chosen: the completion starts with a 'user' turn"):
        split_record({**multi, "chosen": {"from": "human", "value": "?"}})


def test_sharegpt_function_call_and_observation_turns_are_a_tool_call_and_its_result(tokenizer):
    """LLaMA-Factory's ShareGPT tool use (data/README.md; its glaive_toolcall demo set): a `function_call` turn holds
    the call as JSON text, an `observation` turn the result, `tools` a JSON string. Read as the OpenAI form with
    deterministic call ids (nine characters, the form Mistral's templates require)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    sharegpt = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C, sunny"},
        {"from": "gpt", "value": "It is 18C and sunny."}], "tools": json.dumps(tools)}
    openai = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call00000", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call00000", "name": "get_weather", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."}]}
    assert split_record(sharegpt) == split_record(openai)
    assert encode(sharegpt, tokenizer) == encode(openai, tokenizer)
    completion = split_record(sharegpt).completion
    assert completion[0]["tool_calls"][0]["id"] == completion[1]["tool_call_id"] == "call00000"
    two = dict(sharegpt, conversations=[sharegpt["conversations"][0], {"from": "function_call", "value": json.dumps(
        [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "18C"}, {"from": "observation", "value": "25C"},
        {"from": "gpt", "value": "18C and 25C."}])
    calls = split_record(two).completion
    assert [c["id"] for c in calls[0]["tool_calls"]] == ["call00000", "call00001"]
    assert [m["tool_call_id"] for m in calls[1:3]] == ["call00000", "call00001"]
    with pytest.raises(RecordError) as info:
        split_record(dict(sharegpt, conversations=[sharegpt["conversations"][0],
                                                   {"from": "function_call", "value": "{get_weather(Paris)}"}]))
    assert info.value.reason == "bad_tool_call" and info.value.message.startswith("conversations[1].value: a tool call "
                                                                                    "that is not valid JSON")


@pytest.mark.parametrize("parts", [
    # LLaMA-Factory v1's messages format: {"type": ..., "value": ...}
    [{"type": "reasoning", "value": "2 and 2 make 4."}, {"type": "text", "value": ANSWER}],
    # Anthropic's Messages API content blocks: a thinking block, then text
    [{"type": "thinking", "thinking": "2 and 2 make 4."}, {"type": "text", "text": ANSWER}],
], ids=["value-parts", "thinking-blocks"])
@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_content_parts_with_reasoning_are_the_turns_reasoning(tokenizer, parts, train_on_reasoning):
    """Reasoning parts become the turn's reasoning_content (trained or masked as data.train_on_reasoning says), text
    parts its content: the same ids and labels as the record written with reasoning_content."""
    as_parts = {"messages": [{"role": "user", "content": [{"type": "text", "value": ASK}]},
                             {"role": "assistant", "content": parts}]}
    as_fields = {"messages": [{"role": "user", "content": ASK},
                              {"role": "assistant", "content": ANSWER, "reasoning_content": "2 and 2 make 4."}]}
    s = settings(train_on_reasoning=train_on_reasoning)
    assert encode(as_parts, tokenizer, s) == encode(as_fields, tokenizer, s)


def test_other_content_parts_are_refused_naming_the_part():
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                       {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    with pytest.raises(RecordError) as info:
        split_record(image)
    assert info.value.reason == "bad_message" and info.value.message.startswith(
        "messages[0].content[1]: a image_url part in a user message")
    calls = {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": [
        {"type": "tool_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})}]},
        {"role": "tool", "content": [{"type": "observation", "value": "18C"}]},
        {"role": "assistant", "content": "18C."}]}
    completion = split_record(calls).completion
    assert completion[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert completion[1] == {"role": "tool", "content": "18C", "tool_call_id": "call00000", "name": "get_weather"}


# ---- per-message training flags (issue 39, item 5) -----------------------------------------------------------------
# OpenAI's fine-tuning format for chat models: "weight": 0 or 1 on assistant messages, 0 to skip learning from that
# message (multi-turn examples); `train: false` and `loss_weight: 0.0` are the same switch under other names.

def flagged(flag, off_value, on_value=None):
    second = {"role": "assistant", "content": "Paris, of course."}
    if on_value is not None:
        second[flag] = on_value
    return {"messages": [
        {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
        {"role": "user", "content": "What's the capital of France?"},
        {"role": "assistant", "content": "Paris", flag: off_value},
        {"role": "user", "content": "Can you be more sarcastic?"},
        second]}


def trained_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])


@pytest.mark.parametrize("flag, off, on", [("weight", 0, 1), ("train", False, True), ("loss_weight", 0.0, 1.0)])
def test_a_switched_off_assistant_turn_is_untrained_context(tokenizer, flag, off, on):
    record = flagged(flag, off, on)
    plain = {"messages": [{k: v for k, v in m.items() if k != flag} for m in record["messages"]]}
    ids, labels = encode(record, tokenizer)
    ids_all, labels_all = encode(plain, tokenizer)
    assert ids == ids_all  # the same row, only its mask differs
    assert trained_text(tokenizer, ids_all, labels_all) == f"Paris{E}Paris, of course.{E}"
    assert trained_text(tokenizer, ids, labels) == f"Paris, of course.{E}"
    [(ids, labels)] = tokenize_rendered([render(record, settings(), tokenizer)], tokenizer, "all")
    off_turn = f"{S}assistant\nParis{E}\n"  # off even when every other token is trained
    assert trained_text(tokenizer, ids, labels) == tokenizer.decode(ids[1:]).replace(off_turn, "", 1)
    assert off_turn in tokenizer.decode(ids)


def test_switched_off_turns_through_a_models_own_template_on_a_real_tokenizer(tmp_path):
    from template_corpus import TEMPLATES, real_tokenizer

    tok = real_tokenizer("qwen2")
    with open(os.path.join(TEMPLATES, "chujiezheng", "qwen2.5-instruct.jinja"), encoding="utf-8") as f:
        tok.chat_template = f.read()
    record = flagged("weight", 0)
    s = settings(chat_template="model")
    ids, labels = tokenize_rendered([render(record, s, tok)], tok)[0]
    plain = {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]}
    ids_all, labels_all = tokenize_rendered([render(plain, s, tok)], tok)[0]
    assert ids == ids_all and trained_text(tok, ids_all, labels_all) == "Paris<|im_end|>Paris, of course.<|im_end|>"
    assert trained_text(tok, ids, labels) == "Paris, of course.<|im_end|>"
    assert tok.decode(ids).endswith(tok.apply_chat_template(plain["messages"], tokenize=False))
    data = write_jsonl(tmp_path / "flags.jsonl", [record, plain])  # the preflight's checks hold with the turn off
    assert preflight(plan([data], 1 << 20)[0], s, tok)["records"] == 2


@pytest.mark.parametrize("message, reason, text", [
    ({"role": "assistant", "content": "a", "weight": 0.5}, "bad_weight",
     "messages[1].weight: 0.5, and a turn is trained or not (a weighted loss is not offered); fix: 0 (untrained "
     "context) or 1 (trained)"),
    ({"role": "assistant", "content": "a", "train": "no"}, "bad_weight",
     'messages[1].train: must be true or false (got "no"); fix: train: false for a turn to keep as untrained context'),
    ({"role": "assistant", "content": "a", "weight": 0}, "all_turns_switched_off",
     "messages: every assistant turn is switched off (weight), so nothing would be trained; fix: switch one on, or "
     "leave the record out"),
])
def test_bad_training_flags_are_bad_records(message, reason, text):
    with pytest.raises(RecordError) as info:
        split_record({"messages": [{"role": "user", "content": "q"}, message]})
    assert (info.value.reason, info.value.message) == (reason, text)


def test_the_manifest_counts_the_turns_each_flag_switched_off(tmp_path, tokenizer):
    from raysft.data.chunks import chunk_to_examples
    from raysft.data.pipeline import side_counts

    data = write_jsonl(tmp_path / "openai.jsonl", [flagged("weight", 0), flagged("weight", 0, 1),
                                                   flagged("train", False), flagged("loss_weight", 1.0)])
    [chunk], _ = plan([data], 1 << 20)
    result = chunk_to_examples(chunk, settings(), tokenizer)
    counts = side_counts([("train-000000.json", result.counts)], "train")
    assert counts["turns_switched_off"] == {"weight": 2, "train": 1}
    assert counts["turns_history_untrained"] == 0 and counts["records_kept"] == 4


# ---- labelled records and data.where (issue 39, item 6) -------------------------------------------------------------
# TRL's unpaired preference (KTO) format: {"prompt": [...], "completion": [...], "label": true | false}, false marking
# an undesirable completion; UltraFeedback-binarized's score_chosen / score_rejected (numbers) to filter on.

KTO = [{"prompt": [{"role": "user", "content": "Q1"}], "completion": [{"role": "assistant", "content": "good"}],
        "label": True},
       {"prompt": [{"role": "user", "content": "Q2"}], "completion": [{"role": "assistant", "content": "bad"}],
        "label": False},
       {"prompt": [{"role": "user", "content": "Q3"}], "completion": [{"role": "assistant", "content": "fine"}],
        "label": True, "quality": 3}]


def kept(tmp_path, tokenizer, records, **kw):
    from raysft.data.chunks import chunk_to_examples

    data = write_jsonl(tmp_path / "kto.jsonl", records)
    [chunk], _ = plan([data], 1 << 20)
    result = chunk_to_examples(chunk, settings(**kw), tokenizer)
    texts = [tokenizer.decode([t for t, lab in zip(*e) if lab != -100]) for e in result.examples]
    return texts, result.counts


@pytest.mark.parametrize("where, answers, filtered", [
    ({"label": True}, ["good", "fine"], 1),
    ({}, ["good", "bad", "fine"], 0),
    ({"label": True, "quality": {">=": 3}}, ["fine"], 2),  # a missing field does not match
    ({"quality": {"in": [1, 2]}}, [], 3),
    ({"label": {"!=": True}}, ["bad"], 2),
])
def test_data_where_keeps_the_matching_records_and_counts_the_rest(tmp_path, tokenizer, where, answers, filtered):
    texts, counts = kept(tmp_path, tokenizer, KTO, where=where)
    assert texts == [f"{a}{E}" for a in answers]
    assert (counts.get("records_kept", 0), counts.get("records_filtered", 0)) == (len(answers), filtered)


def test_labelled_records_are_refused_until_data_where_says_what_to_do(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "kto.jsonl", KTO)
    with pytest.raises(UserError) as info:
        preflight(plan([data], 1 << 20)[0], settings(), tokenizer)
    assert str(info.value) == (
        f"{data}:1: the record has a 'label' (true: KTO's unpaired format, where false marks an undesirable "
        "completion) and data.where is not set, so every completion would be trained; fix: data.where: {label: true} "
        "to train the desirable ones, or data.where: {} to train them all (found before training, in the first 3 "
        "records)")
    with pytest.raises(RecordError, match="unfiltered_label|data.where is not set"):
        kept(tmp_path, tokenizer, KTO)  # past the preflight's sample too, whatever on_bad_record says
    texts, counts = kept(tmp_path, tokenizer, KTO, on_bad_record="skip")
    assert texts == [] and counts["rejected_by_reason"] == {"unfiltered_label": 3}


def test_a_where_comparison_on_a_field_without_a_number_is_a_bad_record(tmp_path, tokenizer):
    records = [{**KTO[0], "quality": "high"}]
    with pytest.raises(RecordError) as info:
        kept(tmp_path, tokenizer, records, where={"quality": {">": 2}})
    assert info.value.message.startswith('quality: "high", and data.where compares it with > 2; fix: give quality as '
                                         "a number, or change data.where")


# ---- chat transcripts in strings (issue 39, item 7) -----------------------------------------------------------------
# Anthropic's HH-RLHF: "chosen" and "rejected" each a whole transcript, "\n\nHuman: ...\n\nAssistant: ...", the two
# sharing every turn but the last answer (its dataset card).

HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nNothing more to it.\n\nHuman: And 3+3?\n\nAssistant: 6.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nNothing more to it.\n\nHuman: And 3+3?\n\nAssistant: 7."}
ROLES = {"Human": "user", "Assistant": "assistant"}


def test_hh_rlhf_transcripts_are_plain_text_or_with_transcript_roles_turns(tokenizer):
    plain = render(HH, settings(), tokenizer)
    assert not plain.chat and "".join(seg.text for seg in plain.segments) == HH["chosen"] + tokenizer.eos_token
    turns = render(HH, settings(transcript_roles=ROLES), tokenizer)
    same = render({"messages": [{"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "4.\n\nNothing more to it."},
                                {"role": "user", "content": "And 3+3?"},
                                {"role": "assistant", "content": "6."}]}, settings(), tokenizer)
    assert turns.chat and turns.text == same.text
    ids, labels = encode(HH, tokenizer, settings(transcript_roles=ROLES))
    assert trained_text(tokenizer, ids, labels) == f"6.{E}"  # the pair's prompt is every turn they share
    text = {"text": "\n\nHuman: Hi\n\nAssistant: Hello!"}
    ids, labels = encode(text, tokenizer, settings(transcript_roles=ROLES))
    assert trained_text(tokenizer, ids, labels) == f"Hello!{E}"


def test_a_transcript_with_text_before_its_first_speaker_is_a_bad_record():
    from raysft.data.chunks import example_of

    with pytest.raises(RecordError) as info:
        example_of({"text": "Intro\n\nHuman: Hi\n\nAssistant: Hey"}, settings(transcript_roles=ROLES))
    assert (info.value.reason, info.value.message) == (
        "bad_transcript", 'text: text before the first speaker ("Intro"); fix: start it with one of Human:, '
        "Assistant:, or remove data.transcript_roles")


# ---- shapes already read, as published (issue 39, item 8) ----------------------------------------------------------
# Fixtures written from the dataset cards and OpenAI's fine-tuning guide, not copied: UltraFeedback-binarized (a
# `prompt` string, `chosen`/`rejected` full conversations, `messages`, `score_chosen`/`score_rejected`), OpenAI's chat
# fine-tuning JSONL (system/user/assistant, tool calls with string arguments, `tools`, `parallel_tool_calls`), and the
# tulu-3 / SmolTalk mixtures (`messages` with `id` and `source` fields).

ULTRAFEEDBACK = [
    {"prompt": "How many r's are in strawberry?", "prompt_id": "5e1a",
     "chosen": [{"role": "user", "content": "How many r's are in strawberry?"},
                {"role": "assistant", "content": "There are three r's in strawberry."}],
     "rejected": [{"role": "user", "content": "How many r's are in strawberry?"},
                  {"role": "assistant", "content": "Two."}],
     "messages": [{"role": "user", "content": "How many r's are in strawberry?"},
                  {"role": "assistant", "content": "There are three r's in strawberry."}],
     "score_chosen": 9.0, "score_rejected": 2.5},
    {"prompt": "Name a prime.", "prompt_id": "77c0",
     "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
     "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "9"}],
     "messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
     "score_chosen": 6.0, "score_rejected": 6.0},
]


def test_ultrafeedback_binarized_trains_the_chosen_answer_and_filters_on_its_scores(tmp_path, tokenizer):
    ids, labels = encode(ULTRAFEEDBACK[0], tokenizer)
    assert render(ULTRAFEEDBACK[0], settings(), tokenizer).text == render(
        {"messages": ULTRAFEEDBACK[0]["chosen"]}, settings(), tokenizer).text  # the prompt string not repeated
    assert trained_text(tokenizer, ids, labels) == f"There are three r's in strawberry.{E}"
    texts, counts = kept(tmp_path, tokenizer, ULTRAFEEDBACK, where={"score_chosen": {">": 7}})
    assert texts == [f"There are three r's in strawberry.{E}"] and counts["records_filtered"] == 1


OPENAI_TOOLS = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Boston?"},
        {"role": "assistant", "tool_calls": [{"id": "call_id", "type": "function", "function": {
            "name": "get_current_weather", "arguments": "{\"location\": \"Boston, MA\", \"format\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_id", "content": "{\"temperature\": 12}"},
        {"role": "assistant", "content": "It is 12 degrees Celsius in Boston.", "weight": 1},
    ],
    "tools": [{"type": "function", "function": {"name": "get_current_weather", "description": "Current weather",
                                                "parameters": {"type": "object", "properties": {
                                                    "location": {"type": "string"},
                                                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                    "required": ["location", "format"]}}}],
    "parallel_tool_calls": False,
}


def test_openai_chat_fine_tuning_records_with_tool_calls(tokenizer):
    rendered = render(OPENAI_TOOLS, settings(), tokenizer)
    ids, labels = encode(OPENAI_TOOLS, tokenizer)
    call = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Boston, MA", "format": "celsius"}}' \
           '\n</tool_call>'
    assert trained_text(tokenizer, ids, labels) == f"{call}{E}It is 12 degrees Celsius in Boston.{E}"
    assert f'{S}tool\n{{"temperature": 12}}{E}' in rendered.text and '"name": "get_current_weather"' in rendered.prompt
    off = {**OPENAI_TOOLS, "messages": [dict(m) for m in OPENAI_TOOLS["messages"]]}
    off["messages"][2]["weight"] = 0  # the call as context: only the final answer trained
    ids, labels = encode(off, tokenizer)
    assert trained_text(tokenizer, ids, labels) == f"It is 12 degrees Celsius in Boston.{E}"


MIXTURE = [{"id": "oasst1_1", "source": "ai2-adapt-dev/oasst1_converted",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
           {"id": "numina_2", "source": "ai2-adapt-dev/numinamath_tir_math_decontaminated",
            "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
           {"source": "smol-magpie-ultra",
            "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Thanks"},
                         {"role": "assistant", "content": "Anytime."}]}]


def test_tulu_and_smoltalk_mixtures_read_as_messages_and_select_by_source(tmp_path, tokenizer):
    texts, counts = kept(tmp_path, tokenizer, MIXTURE)
    assert texts == [f"Hello!{E}", f"2{E}", f"Anytime.{E}"] and counts["records_kept"] == 3
    texts, counts = kept(tmp_path, tokenizer, MIXTURE, where={"source": {"not in": ["smol-magpie-ultra"]}})
    assert texts == [f"Hello!{E}", f"2{E}"] and counts["records_filtered"] == 1


# ---- the preflight looks at every file (issue 39) -------------------------------------------------------------------

def test_a_file_of_a_shape_raysft_does_not_read_is_refused_before_ray_with_the_nearest_shape(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}] * 100)
    qa = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "Question": "2+2?", "answer": "4"} for i in range(100)])
    tokenizer.chat_template = CHAT_TEMPLATE  # as load_tokenizer sets it under chatml
    with pytest.raises(UserError) as info:  # the second file: beyond the first file's 64 records
        preflight(plan([good, qa], 1 << 20)[0], settings(), tokenizer)
    assert str(info.value) == (f"{qa}: none of its first 32 records has a shape raysft reads (the first one's keys: "
                               "'id', 'Question', 'answer'); fix: the nearest shape raysft reads is prompt/completion: "
                               "map your names onto it with data.columns: {prompt: Question, completion: answer}")
    odd = write_jsonl(tmp_path / "c.jsonl", [{"foo": 1}])
    with pytest.raises(UserError, match=r"c.jsonl: none of its first 1 records has a shape raysft reads \(the first "
                                        r"one's keys: 'foo'\); fix: give records one of the shapes raysft reads "
                                        r"\(messages, conversations \(ShareGPT\), chosen/rejected"):
        preflight(plan([odd], 1 << 20)[0], settings(), tokenizer)
    mixed = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}, {"text": "fine"}])  # one odd record: the policy's
    assert preflight(plan([mixed], 1 << 20)[0], settings(), tokenizer)["records"] == 2
    assert nearest_shape(["prompt", "response"]) == ("prompt/completion", {"prompt": "prompt", "completion": "response"})
