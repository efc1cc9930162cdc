"""Make the quickstart's assets: synthetic preference data and a tiny ChatML model folder.

    python examples/make_assets.py            # writes examples/data/*.jsonl and examples/tiny-chatml/

Everything is generated here, deterministically (seeded), so no download is ever needed:
- `examples/data/sample_prefs.jsonl`: preference pairs (`chosen`/`rejected`, implicit prompt) on small
  tasks a tiny byte-level model learns in minutes: arithmetic, reversing and spelling words, counting
  letters; some with a system message, some multi-turn (the prompt is the first three messages).
- `examples/data/sample_eval.jsonl`: held-out `messages` records of the same tasks.
- `examples/tiny-chatml/`: a Llama config (2 layers, hidden 64) and a byte-level tokenizer (ByT5's,
  which needs no vocabulary file) with `<|im_start|>`/`<|im_end|>` added. `model.from_scratch: true`
  initialises its weights from the seed.
"""

from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("apple river stone cloud maple tiger piano orbit candle meadow lantern copper violet harbor "
         "pepper marble falcon garden silver window rocket basket planet pillow summer winter forest").split()
SYSTEM = "You are a careful assistant. Answer briefly."


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, wrong answer)."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(10, 60), rng.randrange(1, 40)
        wrong = a + b + rng.choice([-3, -1, 1, 2, 10])
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."
    word = rng.choice(WORDS)
    if kind == 1:
        return f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'.", f"'{word}' reversed is '{word}'."
    if kind == 2:
        return f"Spell '{word}' with dashes.", "-".join(word) + ".", "-".join(sorted(word)) + "."
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (f"How many times does '{letter}' appear in '{word}'?", f"'{letter}' appears {n} time{'s' * (n != 1)}.",
            f"'{letter}' appears {n + 1} times.")


def preference_record(rng: random.Random) -> dict:
    q, good, bad = _task(rng)
    head = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    if rng.random() < 0.3:  # multi-turn: the prompt is the first three messages
        q0, a0, _ = _task(rng)
        head += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
    prompt = head + [{"role": "user", "content": q}]
    return {"chosen": prompt + [{"role": "assistant", "content": good}],
            "rejected": prompt + [{"role": "assistant", "content": bad}]}


def messages_record(rng: random.Random) -> dict:
    q, good, _ = _task(rng)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]}


def write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def make_tokenizer():
    from transformers import ByT5Tokenizer

    from raysft.data.tokenize import add_chatml_tokens

    tokenizer = ByT5Tokenizer()
    add_chatml_tokens(tokenizer)
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=None, eos_token_id=None)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_model_folder(path: str) -> None:
    tokenizer = make_tokenizer()
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    tiny_llama_config(len(tokenizer)).save_pretrained(path)


def main(root: str = HERE, n_train: int = 1200, n_eval: int = 64) -> None:
    rng = random.Random(1234)
    write_jsonl(os.path.join(root, "data", "sample_prefs.jsonl"), (preference_record(rng) for _ in range(n_train)))
    write_jsonl(os.path.join(root, "data", "sample_eval.jsonl"), (messages_record(rng) for _ in range(n_eval)))
    make_model_folder(os.path.join(root, "tiny-chatml"))


if __name__ == "__main__":
    main(*(sys.argv[1:2] or [HERE]))
