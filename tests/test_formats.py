"""Data as people keep it (issue 13, part 1): Alpaca records, `data.columns` for a dataset's own schema, and the
EOS token that ends plain text (trained, so a model learns to stop)."""

from __future__ import annotations

import pytest

from raysft.data.chatml import CHAT_TEMPLATE, IM_END, IM_START
from raysft.data.chunks import Settings, render
from raysft.data.preflight import check_columns, preflight
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
