"""The longest row that trains under a memory cap per worker: sequence parallelism 1 against 2 (CPU, gloo).

    python bench/long_rows.py                               # cap 1,500 MB peak RSS per worker, 2 layers, hidden 256
    python bench/long_rows.py --cap-mb 2000 --lengths 8192,16384,32768

For each setting, one training step (forward + backward of every micro-batch, AdamW step) on rows of one example
each (a long trace; sdpa's causal CPU kernel, no mask), at growing lengths, until a worker's peak resident set
(VmHWM, the whole process: Python, torch, DeepSpeed, model, optimizer state and the step) passes the cap, then
bisected (to --step tokens) between the last length that fit and the first that did not. Every
step runs in fresh processes: SP=1 in one (as each worker of a data-parallel run), SP=2 in two gloo processes that
form one group, each scheduled one row of that length and training its half of both rows — the same tokens per
worker and step as SP=1. Each setting is measured plain, and with gradient checkpointing (activations offloaded
to CPU memory) and tiled MLP, as configs/qwen2.5-0.5b-long-sp.yaml trains. The ratio is SP=2's longest row / SP=1's,
measured in the same run; each process imports the same modules, so their resident sets start equal.
What runs is raysft's own code: `raysft.loss` (chunked), `raysft.train.sequence_parallel` (DeepSpeed's Ulysses
attention, its loader adapter, TiledMLP), as the deepspeed backend calls it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import time


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _worker(rank: int, world: int, port: int, args: dict, length: int, alst: bool, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
    import deepspeed  # noqa: F401  (both settings import the same modules: equal resident sets at the start)
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from raysft import loss
    from raysft.train import sequence_parallel

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=args["hidden"], intermediate_size=4 * args["hidden"],
                         num_hidden_layers=args["layers"], num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=1 << 20)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    loss.attach(model, "chunked")
    if alst:
        sequence_parallel.offload_activations(model)  # gradient checkpointing, layer inputs in CPU memory
        sequence_parallel.tile_mlp(model)
    sp = sequence_parallel.setup(model, world, 1, torch.device("cpu"), pad_id=0) if world > 1 else None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1 + rank)

    def step(n: int) -> float:
        ids = torch.randint(3, 384, (1, n), generator=g)
        labels = ids.clone()
        labels[:, 0] = -100
        batches = [{"input_ids": ids, "labels": labels, "position_ids": torch.arange(n)[None]}]
        trained = (n - 1) * world
        total = torch.zeros(())
        for batch in sp.shard(batches) if sp else batches:
            part = loss.loss_sum(model, batch) / trained
            part.backward()
            total += part.detach()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return total.item()

    step(256 * world)  # warm-up: gradients and optimizer state exist
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current resident set
    before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    value = step(length)
    seconds = time.perf_counter() - t0
    peak = torch.tensor(_rss_mb("VmHWM"))
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    value = torch.tensor(value)
    dist.all_reduce(value)  # the ranks' parts of the global batch's loss
    value = float(value)
    if rank == 0:
        out.put({"sp": world, "alst": alst, "length": length, "peak_mb": round(float(peak), 1),
                 "step_mb": round(float(peak) - before, 1), "seconds": round(seconds, 1), "loss": round(value, 4)})
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, args: dict, length: int, alst: bool) -> dict:
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, length, alst, q)) for r in range(world)]
    for p in procs:
        p.start()
    result = q.get()
    for p in procs:
        p.join()
    return result


def longest_row(setting: str, world: int, args: dict, lengths: list[int], cap_mb: float, step: int) -> int:
    """Up the lengths until one passes the cap, then bisect (to `step` tokens) between the last that fit and it."""

    def under_cap(n: int) -> bool:
        r = measure(world, args, n, setting == "alst")
        print(json.dumps({"setting": setting, **r}), flush=True)
        return r["peak_mb"] <= cap_mb

    fits, fails = 0, None
    for n in lengths:
        if not under_cap(n):
            fails = n
            break
        fits = n
    while fails and fails - fits > step:
        mid = (fits + fails) // 2 // step * step
        if mid <= fits:
            break
        fits, fails = (mid, fails) if under_cap(mid) else (fits, mid)
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap-mb", type=float, default=1500.0, help="peak resident set per worker")
    ap.add_argument("--lengths", default="4096,8192,12288,16384,24576,32768,49152,65536")
    ap.add_argument("--step", type=int, default=2048, help="bisect between lengths down to this many tokens")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--settings", default="plain,alst", help="plain, alst (checkpointing + offload + tiled MLP)")
    a = ap.parse_args()
    args = {"layers": a.layers, "hidden": a.hidden}
    lengths = [int(n) for n in a.lengths.split(",")]
    longest = {(setting, world): longest_row(setting, world, args, lengths, a.cap_mb, a.step)
               for setting in a.settings.split(",") for world in (1, 2)}
    print(f"Llama, {a.layers} layers, hidden {a.hidden}, 8 heads (2 key/value), fp32, CPU; cap {a.cap_mb:.0f} MB peak "
          f"RSS per worker; lengths tried: {a.lengths}")
    for setting in a.settings.split(","):
        one, two = longest[setting, 1], longest[setting, 2]
        ratio = f"{two / one:.2f}" if one else "n/a (SP=1 fits none)"
        print(f"{setting}: longest row under the cap: SP=1 {one} tokens, SP=2 {two} tokens; ratio SP=2/SP=1 {ratio}"
              + (" (at least: SP=2 fit the longest length tried)" if two == lengths[-1] else ""))


if __name__ == "__main__":
    main()
