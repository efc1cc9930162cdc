"""The cost of a model's own chat template: one chunk's work (parse, render, tokenize with the mask, fit) under
`data.chat_template: model` against `chatml`, on the same records, in one process.

    python bench/templates.py                  # 5,000 generated preference records (about a minute on 2 cores)
    python bench/templates.py --records 2000

`model` renders through Jinja by prefixes (two renders per assistant turn, each checked to extend the one before);
`chatml` builds its segments directly. The peer of `model` is `chatml` with the tokenizer's template set to
raysft's ChatML Jinja twin, so both give the same ids (checked here). Also timed: the preflight on 64 records.
"""

from __future__ import annotations

import argparse
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
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
