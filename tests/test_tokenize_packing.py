from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from raysft.data.chatml import render_example
from raysft.data.packing import bfd_bins, fit_length, make_rows
from raysft.data.records import split_record
from raysft.data.tokenize import IGNORE_INDEX, tokenize_rendered

S, E = "<|im_start|>", "<|im_end|>"


def tok(record, tokenizer, loss_on="completion"):
    return tokenize_rendered([render_example(split_record(record))], tokenizer, loss_on)[0]


def test_labels_train_assistant_content_and_closing_im_end_only(tokenizer):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                           {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]}
    ids, labels = tok(record, tokenizer)
    text = tokenizer.decode(ids)
    assert text == f"{S}user\nhi{E}\n{S}assistant\nyo{E}\n{S}user\nq{E}\n{S}assistant\nok{E}\n"
    trained = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == f"yo{E}ok{E}"
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))


def test_loss_on_all_trains_every_token_but_the_first(tokenizer):
    ids, labels = tok({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                      tokenizer, loss_on="all")
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_literal_control_token_in_content_is_never_the_control_token(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids(E)
    im_start = tokenizer.convert_tokens_to_ids(S)
    ids, _ = tok({"messages": [{"role": "user", "content": f"x{E}y{S}"}, {"role": "assistant", "content": E}]},
                 tokenizer)
    assert Counter(ids)[im_end] == 2 and Counter(ids)[im_start] == 2  # the template's two messages only
    assert tokenizer.decode(ids) == f"{S}user\nx{E}y{S}{E}\n{S}assistant\n{E}{E}\n"


def test_fit_length_truncates_or_drops():
    assert fit_length([1, 2, 3, 4], [5, 6, 7, 8], 3, "truncate") == ([1, 2, 3], [5, 6, 7])
    assert fit_length([1, 2, 3, 4], [5, 6, 7, 8], 3, "drop") is None
    assert fit_length([1, 2], [3, 4], 3, "drop") == ([1, 2], [3, 4])


lengths_strategy = st.lists(st.integers(min_value=1, max_value=64), min_size=0, max_size=200)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(min_value=64, max_value=256))
def test_packing_loses_and_duplicates_no_token(lengths, capacity):
    examples = []
    next_id = 0
    for n in lengths:  # every token unique, so a lost or duplicated token shows
        examples.append((list(range(next_id, next_id + n)), [-100] + list(range(next_id + 1, next_id + n))))
        next_id += n
    rows = make_rows(examples, capacity, packing=True)
    flat = [t for row in rows.input_ids for t in row]
    assert sorted(flat) == list(range(next_id))
    for ids, labels, pos, seqs in zip(rows.input_ids, rows.labels, rows.position_ids, rows.seq_lengths):
        assert len(ids) == len(labels) == len(pos) == sum(seqs) <= capacity
        assert pos == [p for n in seqs for p in range(n)]  # restart at every example
        start = 0
        for n in seqs:  # each example is contiguous and whole inside its row
            assert ids[start: start + n] == list(range(ids[start], ids[start] + n))
            start += n
    # an example only opens a new row when it fits in no open row, so no two rows could be merged
    sizes = sorted(len(r) for r in rows.input_ids)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > capacity


def test_padding_mode_is_one_example_per_row():
    rows = make_rows([([1, 2], [-100, 2]), ([3], [-100])], 8, packing=False)
    assert rows.input_ids == [[1, 2], [3]] and rows.seq_lengths == [[2], [1]]


def test_bfd_packs_as_tightly_as_trl(tokenizer):
    """Same lengths, same capacity: our bins vs TRL's private _pack_bfd, measured in the same run."""
    import random

    import pyarrow as pa
    from trl.data_utils import _pack_bfd

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(3000)]
    ours = len(bfd_bins(lengths, 512))
    table = pa.table({"input_ids": [[1] * n for n in lengths]})
    theirs = len(_pack_bfd(table, 512))
    assert ours <= theirs


def test_fast_path_equals_transformers_call_with_split_special_tokens():
    """encode_texts calls the Rust tokenizer directly; it must give what transformers' own call gives."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from raysft.data.tokenize import add_chatml_tokens, encode_texts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["hello world, the assistant says hi", "user asks: what is 2 + 2?", "Zürich 東京"] * 50
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=[S, E],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe)
    add_chatml_tokens(fast)
    texts = corpus[:3] + [f"x{E}y{S}", "\n", "assistant\n", "\n", ""]
    expected = fast(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert encode_texts(fast, texts) == expected
    assert encode_texts(fast, texts) == expected  # second time from the memo
    assert fast(f"x{E}", add_special_tokens=False)["input_ids"][-1] == fast.convert_tokens_to_ids(E)  # state restored
