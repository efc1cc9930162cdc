"""The cost of a model's own chat template: one chunk's work (parse, render, tokenize with the mask, fit) under
`data.chat_template: model` against `chatml`, on the same records, in one process.

    python bench/templates.py                  # 5,000 generated preference records (about a minute on 2 cores)
    python bench/templates.py --records 2000
    python bench/templates.py --real ../shared     # also the real Qwen2 tokenizer (151,936 ids) with Qwen2.5's own
                                                   # template from ../shared/templates: its path per chunk, preflight

`model` renders through Jinja by prefixes (two renders per assistant turn, each checked to extend the one before);
`chatml` builds its segments directly. The peer of `model` is `chatml` with the tokenizer's template set to
raysft's ChatML Jinja twin, so both give the same ids (checked here). Also timed: the preflight on 64 records.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--real", default=None, help="the shared folder (../shared): time the real Qwen2 tokenizer too")
    args = ap.parse_args()

    from prepare import make_data, train_tokenizer
    from transformers import AutoTokenizer

    from raysft.data.chatml import CHAT_TEMPLATE
    from raysft.data.chunks import Settings, chunk_to_examples
    from raysft.data.preflight import preflight
    from raysft.data.sources import plan

    tmp = tempfile.mkdtemp(prefix="raysft-bench-templates-")
    data = os.path.join(tmp, "data.jsonl")
    make_data(data, args.records)
    tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(data, os.path.join(tmp, "tok")))
    tokenizer.chat_template = CHAT_TEMPLATE
    chunks, _ = plan([data], 1 << 40)  # one chunk: the whole file

    def run(mode: str):
        s = Settings(max_seq_len=2048, packing=True, loss_on="completion", system_message=None, on_bad_record="error",
                     on_overlong="truncate", hf_split="train", eval_fraction=0.0, chat_template=mode)
        t0 = time.perf_counter()
        result = chunk_to_examples(chunks[0], s, tokenizer)
        return time.perf_counter() - t0, result, s

    run("chatml")  # warm-up: tokenizer memo, imports
    times = {}
    for mode in ("chatml", "model"):
        seconds, result, s = run(mode)
        times[mode] = (seconds, result)
        print(f"{mode:6s}: {args.records / seconds:9.0f} records/s ({seconds:.2f} s, {len(result.examples)} examples)")
    same = times["chatml"][1].examples == times["model"][1].examples
    print(f"same ids and labels: {same}")
    t0 = time.perf_counter()
    checked = preflight(chunks, s, tokenizer)
    print(f"preflight on {checked['records']} records: {time.perf_counter() - t0:.3f} s")
    print(f"model / chatml speed: {times['chatml'][0] / times['model'][0]:.2f}")
    if args.real:
        real = real_qwen2(args.real, tmp)
        real.chat_template = open(os.path.join(args.real, "templates", "chujiezheng", "qwen2.5-instruct.jinja"),
                                  encoding="utf-8").read()
        rs = dataclasses.replace(s, chat_template="model")
        t0 = time.perf_counter()
        result = chunk_to_examples(chunks[0], rs, real)
        seconds = time.perf_counter() - t0
        print(f"real Qwen2 tokenizer ({len(real)} ids), Qwen2.5's template: {args.records / seconds:9.0f} records/s "
              f"({seconds:.2f} s, {len(result.examples)} examples)")
        t0 = time.perf_counter()
        checked = preflight(chunks, rs, real)
        print(f"real Qwen2 tokenizer: preflight on {checked['records']} records: {time.perf_counter() - t0:.3f} s")
    if not same:
        sys.exit(1)


def real_qwen2(shared: str, tmp: str):
    """../shared/tokenizers/qwen2 (its tokenizer.json gunzipped), as AutoTokenizer loads it."""
    import gzip
    import shutil

    from transformers import AutoTokenizer

    src, dst = os.path.join(shared, "tokenizers", "qwen2"), os.path.join(tmp, "qwen2")
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".gz"):
            with gzip.open(os.path.join(src, f)) as z, open(os.path.join(dst, f[:-3]), "wb") as out:
                out.write(z.read())
        else:
            shutil.copy(os.path.join(src, f), dst)
    return AutoTokenizer.from_pretrained(dst)


if __name__ == "__main__":
    main()
