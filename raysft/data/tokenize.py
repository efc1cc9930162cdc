"""Rendered segments -> input_ids and labels; the loss mask is born with the tokens.

Text segments are tokenized as text (`split_special_tokens=True`), so a `<|im_end|>` typed by a user
never becomes the control token; control segments become their single token id. Labels are
IGNORE_INDEX (-100) outside the trained part, and at each example's first token (it is never
predicted, which also keeps a packed row's loss equal to the examples' losses alone).
This module imports neither ray nor torch.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional, Sequence

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
        if out and not seg.control and not out[-1].control and out[-1][2:] == seg[2:]:  # trained and off alike
            out[-1] = seg._replace(text=out[-1].text + seg.text)
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


_prefixing: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (newline ids, after control)
_PROBE = "\n"


def continuation(tokenizer) -> tuple[Optional[list], bool]:
    """How a SentencePiece-style (Metaspace) tokenizer encodes a segment in the middle of a text: (the ids of a
    newline when a text encoded alone gets a start marker, "▁", that the same text inside a longer one does not, else
    None; whether a segment right after a control token is encoded as a text of its own, marker and all, which
    Metaspace's prepend_scheme "always" and legacy tokenizers do). A continuing segment is encoded as newline +
    segment, less the newline's ids: what the tokenizer gives for it inside the whole text."""
    if tokenizer not in _prefixing:
        newline = encode_texts(tokenizer, [_PROBE])[0]
        alone, inside = encode_texts(tokenizer, ["a", _PROBE + "a"])
        prefix = newline if inside[len(newline):] != alone and inside[:len(newline)] == newline else None
        after_control = False
        special = next((t for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) if t), None)
        if prefix is not None and special is not None:
            whole = tokenizer(special + "a", add_special_tokens=False)["input_ids"]
            after_control = whole[1:] == alone
        _prefixing[tokenizer] = (prefix, after_control)
    return _prefixing[tokenizer]


def _encode_segments(tokenizer, merged: list) -> list[list[int]]:
    """Every text segment's ids, in order; a segment in the middle of its example as a continuation."""
    prefix, after_control = continuation(tokenizer)
    if prefix is None:  # the common case: a segment encodes alike alone and inside a text
        return encode_texts(tokenizer, [s.text for segs in merged for s in segs if not s.control])
    texts, continued = [], []
    for segs in merged:
        for k, seg in enumerate(segs):
            if not seg.control:
                cont = k > 0 and not (after_control and segs[k - 1].control)
                texts.append(_PROBE + seg.text if cont else seg.text)
                continued.append(cont)
    out = encode_texts(tokenizer, texts)
    for i, cont in enumerate(continued):
        if cont:
            ids = out[i]
            out[i] = ids[len(prefix):] if ids[:len(prefix)] == prefix else encode_texts(tokenizer, [texts[i][1:]])[0]
    return out


def tokenize_rendered(rendered: Sequence[Rendered], tokenizer, loss_on: str = "completion"):
    """Token ids and labels for each rendered example, all text segments tokenized in one batch call.

    Returns a list of ``(input_ids, labels)`` pairs of equal length. With ``loss_on="all"`` every token but
    the first is trained.
    """
    control_ids: dict[str, list[int]] = {}
    merged = [_merged(r.segments) for r in rendered]
    encoded = iter(_encode_segments(tokenizer, merged))
    out = []
    for segs in merged:
        ids: list[int] = []
        labels: list[int] = []
        for seg in segs:
            if seg.control:
                piece = control_ids.get(seg.text)
                if piece is None:
                    piece = control_ids[seg.text] = [tokenizer.convert_tokens_to_ids(seg.text)]
            else:
                piece = next(encoded)
            ids.extend(piece)
            labels.extend(piece if seg.trained or (loss_on == "all" and not seg.off) else [IGNORE_INDEX] * len(piece))
        if labels:
            labels[0] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def count_trained(labels: Sequence[int]) -> int:
    return len(labels) - labels.count(IGNORE_INDEX)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, where: str = "tokenizer.name_or_path",
                   chat_template: str = "chatml"):
    """A tokenizer from a hub id or folder, ready for `data.chat_template`; a clear UserError when it cannot be.

    ``chatml``: the ChatML tokens added where missing and raysft's ChatML template set. ``model``: the tokenizer's
    own template, which it must have. ``auto``: ``model`` when it has one, else ``chatml`` (`auto_template`). A
    path: that Jinja file's template. A pad token is set where missing.
    """
    return ready_tokenizer(raw_tokenizer(name_or_path, trust_remote_code, where), chat_template, name_or_path)


def raw_tokenizer(name_or_path: str, trust_remote_code: bool = False, where: str = "tokenizer.name_or_path"):
    """The tokenizer as its files give it; a UserError naming `where` when it cannot be loaded."""
    from transformers import AutoTokenizer

    from raysft.errors import UserError, cause, format_error

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors...
        raise UserError(format_error(where, "cannot load tokenizer", name_or_path,
                                     f"give a local folder with tokenizer files or a hub id you can reach "
                                     f"({cause(exc)})")) from exc


def auto_template(tokenizer) -> str:
    """What `data.chat_template: auto` is for this tokenizer (as loaded, before `ready_tokenizer`): its own
    template (``model``) when it has one, raysft's ``chatml`` when it has none."""
    return "model" if tokenizer.chat_template else "chatml"


def ready_tokenizer(tokenizer, chat_template: str, name_or_path: str = ""):
    """`tokenizer` (as loaded) set up for `data.chat_template` (see `load_tokenizer`)."""
    from raysft.data.chatml import CHAT_TEMPLATE

    if chat_template == "auto":
        chat_template = auto_template(tokenizer)
    if chat_template == "chatml":
        add_chatml_tokens(tokenizer)
        tokenizer.chat_template = CHAT_TEMPLATE
        return tokenizer
    if chat_template == "model" or (chat_template.startswith("model:") and not os.path.isfile(chat_template)):
        tokenizer.chat_template = own_template(tokenizer.chat_template, chat_template, name_or_path)
    else:
        tokenizer.chat_template = read_template(chat_template)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is never trained: any id does
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def own_template(templates, chat_template: str, name_or_path: str) -> str:
    """The tokenizer's template that `data.chat_template` (``model`` or ``model:NAME``) picks: its only one, its
    ``default`` entry when it has named ones (tokenizer_config.json's list, additional_chat_templates/), or the one
    named. A UserError listing the names it has otherwise. Training, the preflight and the export then use that
    one alone, so what trains is what renders."""
    from raysft.errors import UserError, format_error

    name = chat_template.partition(":")[2].strip() or None
    if isinstance(templates, dict) and templates:
        have = ", ".join(f"model:{n}" for n in sorted(templates))
        if name is None and "default" not in templates:
            raise UserError(format_error("data.chat_template", "the tokenizer has named chat templates and none is "
                                         "called default", name_or_path, f"name the one to train with: {have}"))
        chosen = templates.get(name or "default")
        if chosen is None:
            raise UserError(format_error("data.chat_template", f"the tokenizer has no chat template named {name!r}",
                                         chat_template, f"use one it has: {have}"))
        templates = chosen
    elif name not in (None, "default") and isinstance(templates, str) and templates.strip():
        raise UserError(format_error("data.chat_template", f"the tokenizer has no chat template named {name!r} "
                                     "(it has one template, unnamed)", chat_template, "use data.chat_template: model"))
    if not isinstance(templates, str) or not templates.strip():
        raise UserError(format_error("data.chat_template", "the tokenizer has no chat template", name_or_path,
                                     "use a tokenizer whose tokenizer_config.json (or chat_template.jinja) has "
                                     "one, give a .jinja file as data.chat_template, or use "
                                     "data.chat_template: chatml"))
    return templates


def read_template(path: str) -> str:
    """A `.jinja` chat template file's text; a UserError naming `data.chat_template` when it cannot be read."""
    from raysft.errors import UserError, format_error

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(format_error("data.chat_template", "cannot read the chat template file", path,
                                     f"give chatml, model, or a readable UTF-8 .jinja file ({exc})")) from None
    if not text.strip():
        raise UserError(format_error("data.chat_template", "the chat template file is empty", path,
                                     "write the Jinja template into it"))
    return text
