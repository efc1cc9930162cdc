"""Rendered segments -> input_ids and labels; the loss mask is born with the tokens.

Text segments are tokenized as text (`split_special_tokens=True`), so a `<|im_end|>` typed by a user
never becomes the control token; control segments become their single token id. Labels are
IGNORE_INDEX (-100) outside the trained part, and at each example's first token (it is never
predicted, which also keeps a packed row's loss equal to the examples' losses alone).
This module imports neither ray nor torch.
"""

from __future__ import annotations

import weakref
from typing import Sequence

from raysft.data.chatml import CONTROL_TOKENS, Rendered, Segment

IGNORE_INDEX = -100


def add_chatml_tokens(tokenizer) -> int:
    """Add `<|im_start|>`/`<|im_end|>` as special tokens where missing, and a pad token; returns how many were added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in CONTROL_TOKENS if t not in vocab]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CONTROL_TOKENS[1]
    return added


def _merged(segments: Sequence[Segment]) -> list[Segment]:
    """Adjacent text segments with the same training flag become one (fewer, more natural tokenizer calls)."""
    out: list[Segment] = []
    for seg in segments:
        if out and not seg.control and not out[-1].control and out[-1].trained == seg.trained:
            out[-1] = Segment(out[-1].text + seg.text, trained=seg.trained)
        elif seg.text:
            out.append(seg)
    return out


_MEMO_MAX_CHARS = 24  # short strings repeat in every example ("\n", "assistant\n")
_MEMO_MAX_ENTRIES = 100_000
_memos: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {text: ids}


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, special-token syntax kept as plain text (`split_special_tokens=True`).

    Fast (Rust) tokenizers are called directly: `encode_batch_fast` with `encode_special_tokens` on is
    what `tokenizer(texts, split_special_tokens=True)` does, without transformers' per-encoding Python
    conversion (half the time of the whole prepare step, measured by bench/prepare.py).
    """
    memo = _memos.setdefault(tokenizer, {})  # short strings are tokenized once per tokenizer
    todo = list(dict.fromkeys(t for t in texts if t not in memo))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not todo:
        fresh = []
    elif backend is not None and hasattr(backend, "encode_batch_fast"):
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            fresh = [e.ids for e in backend.encode_batch_fast(todo, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before
    else:
        fresh = tokenizer(todo, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    found = dict(zip(todo, fresh))
    for text, ids in found.items():
        if len(text) <= _MEMO_MAX_CHARS and len(memo) < _MEMO_MAX_ENTRIES:
            memo[text] = ids
    return [memo[t] if t in memo else found[t] for t in texts]


def tokenize_rendered(rendered: Sequence[Rendered], tokenizer, loss_on: str = "completion"):
    """Token ids and labels for each rendered example, all text segments tokenized in one batch call.

    Returns a list of ``(input_ids, labels)`` pairs of equal length. With ``loss_on="all"`` every token but
    the first is trained.
    """
    control_ids = dict(zip(CONTROL_TOKENS, tokenizer.convert_tokens_to_ids(list(CONTROL_TOKENS))))
    merged = [_merged(r.segments) for r in rendered]
    encoded = iter(encode_texts(tokenizer, [s.text for segs in merged for s in segs if not s.control]))
    out = []
    for segs in merged:
        ids: list[int] = []
        labels: list[int] = []
        for seg in segs:
            piece = [control_ids[seg.text]] if seg.control else next(encoded)
            ids.extend(piece)
            labels.extend(piece if (seg.trained or loss_on == "all") else [IGNORE_INDEX] * len(piece))
        if labels:
            labels[0] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def count_trained(labels: Sequence[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, where: str = "tokenizer.name_or_path"):
    """A tokenizer from a hub id or folder, with the ChatML tokens; a clear UserError when it cannot load."""
    from transformers import AutoTokenizer

    from raysft.errors import UserError, cause, format_error

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise UserError(format_error(where, "cannot load tokenizer", name_or_path,
                                     f"give a local folder with tokenizer files or a hub id you can reach "
                                     f"({cause(exc)})")) from exc
    add_chatml_tokens(tokenizer)
    return tokenizer
