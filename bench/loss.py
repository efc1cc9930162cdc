"""Peak memory and time of the loss's forward + backward: train.fused_loss chunked against none (full fp32 logits).

    python bench/loss.py                      # hidden 896, vocabulary 151,936, 4,096 tokens, 30% trained
    python bench/loss.py --tokens 8192 --trained 0.5

The model is a Llama with no decoder layer (embeddings → final norm → output head, untied, fp32), so what is
measured is the loss path itself, through raysft's own `loss.attach`/`loss_sum`, as the workers call it. Each kind
runs in a fresh process; peak memory is the process's peak resident set (VmHWM, reset just before the measured
forward + backward) above its resident set at that moment (model, gradients' buffers, batch already there: one
warm-up step runs first). The ratio is chunked / none, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _measure(kind: str, hidden: int, vocab: int, tokens: int, trained: float, out) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raysft import loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=0,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    loss.attach(model, kind)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    labels = ids.clone()
    labels[torch.rand((1, tokens), generator=g) >= trained] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(tokens)[None]}
    loss.loss_sum(model, batch).backward()  # warm-up: gradient buffers exist, allocator primed
    model.zero_grad(set_to_none=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    value = loss.loss_sum(model, batch)
    value.backward()
    seconds = time.perf_counter() - t0
    out.put({"kind": kind, "peak_mb": (_rss_kb("VmHWM") - base) / 1024, "seconds": seconds, "loss": value.item(),
             "trained": int((labels[:, 1:] != -100).sum())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--trained", type=float, default=0.3)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for kind in ("none", "chunked"):
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(kind, args.hidden, args.vocab, args.tokens, args.trained, q))
        p.start()
        results[kind] = q.get()
        p.join()
        print(json.dumps(results[kind]))
    a, b = results["chunked"], results["none"]
    print(f"hidden {args.hidden}, vocabulary {args.vocab}, {args.tokens} tokens, {a['trained']} trained: "
          f"peak memory of the loss's forward+backward: chunked {a['peak_mb']:.0f} MB, none {b['peak_mb']:.0f} MB")
    print(f"ratio chunked/none: peak memory {a['peak_mb'] / b['peak_mb']:.3f} (goal <= 0.25), "
          f"time {a['seconds'] / b['seconds']:.2f}; loss {a['loss']:.6g} vs {b['loss']:.6g}")


if __name__ == "__main__":
    main()
