"""Attention for packed rows: forward + backward time of every implementation that runs here, against sdpa.

    python bench/attention.py                 # Llama hidden 256, 4 layers, one 2,048-token row of 8 examples
    python bench/attention.py --seq 4096 --examples 16

Every implementation gets the same packed row (position_ids restarting per example, no attention mask), so each
keeps the examples apart its own way: sdpa and eager with transformers' block-diagonal mask, flex_attention with a
block mask it compiles (blocks outside every example skipped), flash_attention_2/3 (CUDA, when installed) with the
sequence boundaries read from position_ids. Median of 5 timed steps after 2 warm-up steps (flex compiles in its
warm-up); the ratio is each one's time / sdpa's, measured in the same run. `model.attn_implementation: auto` is
chosen from these figures (raysft/modeling.py `resolve_attention`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from raysft.modeling import attention_available

    from make_assets import tiny_llama_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = tiny_llama_config(1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                               num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                               num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (1, args.seq), generator=g, device="cpu").to(device)
    length = args.seq // args.examples
    position_ids = (torch.arange(args.seq) % length)[None].to(device)
    times = {}
    for impl in attention_available(cuda):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=dtype).to(device)
        model.config.use_cache = False
        steps = []
        try:
            for i in range(7):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
                out.float().mean().backward()
                if cuda:
                    torch.cuda.synchronize()
                if i >= 2:
                    steps.append(time.perf_counter() - t0)
        except NotImplementedError as exc:  # flex_attention has no backward on CPU
            print(f"  {impl}: cannot train here ({str(exc).splitlines()[0]})")
            continue
        times[impl] = statistics.median(steps)
        del model
    where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{where}: Llama hidden {args.hidden}, {args.layers} layers, one {args.seq}-token row of "
          f"{args.examples} examples, forward+backward median")
    for impl, s in times.items():
        print(f"  {impl:18s} {s * 1000:8.1f} ms   ratio to sdpa {s / times['sdpa']:.2f}")


if __name__ == "__main__":
    main()
