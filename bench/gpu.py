"""GPU throughput: raysft (deepspeed backend, ZeRO-2, bf16) against TRL's SFTTrainer on the same rows, same GPU.

    python bench/train.py gpu --steps 30                 # Qwen2-0.5B and Qwen2-1.5B shapes (random init)
    python bench/train.py gpu --shapes 0.5b --steps 30
    python bench/train.py gpu --smoke                     # CPU, tiny shape, 3 steps: checks the script runs

Both train on the same prepared rows (raysft's prepare: 2,048-token packed rows of long synthetic chats) with the
same global batch (micro-batch 4 x accumulation 4 on one GPU). TRL runs the way its docs recommend for speed:
one process, `padding_free=True` on the packed rows (its collator restarts position_ids at each example from the
rows' `seq_lengths` and passes the sequence boundaries to the varlen kernel), its fused LM head, the best attention
installed (flash_attention_3/2, else sdpa), no gradient checkpointing. Each side prints median tokens/s and MFU
over the steps after warm-up (6N plus attention FLOPs over the GPU's bf16 dense peak, the formula of
raysft/train/metrics.py for both) and its peak GPU memory; then the ratios, and the top 5 CUDA kernels by time
of raysft's step (torch profiler, 3 steps of the same model, loss and attention outside Ray).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
WARMUP = 5
SHAPES = {  # Qwen2 family configs (hidden, layers, intermediate, heads, kv heads), vocabulary 151,936, tied
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2),
}


def model_folder(work: str, shape: str) -> str:
    from transformers import Qwen2Config

    from make_assets import make_tokenizer

    path = os.path.join(work, f"qwen2-{shape}-shape")
    tok = make_tokenizer()
    tok.save_pretrained(path)
    vocab = len(tok) if shape == "smoke" else 151936
    Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True,
                **SHAPES[shape]).save_pretrained(path)
    return path


def long_chats(work: str, n: int) -> str:
    from make_assets import preference_record

    path = os.path.join(work, "long.jsonl")  # long answers, so that packed rows fill 2048 tokens
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            r = preference_record(rng)
            r["chosen"][-1]["content"] = (r["chosen"][-1]["content"] + " ") * 20
            f.write(json.dumps(r) + "\n")
    return path


def flops_per_token(n_params: int, layers: int, hidden: int, context: float) -> float:
    return 6 * n_params + 6 * layers * hidden * context


def best_attention(cuda: bool) -> str:
    from raysft.modeling import resolve_attention

    return resolve_attention("auto", cuda)[0]


def run_trl(prepared_dir: str, model_dir: str, steps: int, micro: int, accumulation: int, cuda: bool, out) -> None:
    """TRL's SFTTrainer alone in this process: per-step times, tokens and peak memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from raysft.data.prepared import PreparedRows
    from raysft.train.metrics import gpu_peak

    rows = PreparedRows(prepared_dir)
    ds = rows.ds.select_columns(["input_ids", "labels", "seq_lengths"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), attn_implementation=best_attention(
        cuda), dtype=torch.bfloat16 if cuda else torch.float32)
    model.to("cuda" if cuda else "cpu")
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = SFTConfig(output_dir=os.path.join(prepared_dir, "trl-out"), max_steps=steps,
                     per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, learning_rate=1e-5,
                     bf16=cuda, use_cpu=not cuda, padding_free=True, packing=False, max_length=None,
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                     gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
                     disable_tqdm=True, dataloader_num_workers=2, dataloader_pin_memory=cuda, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(Timer())
    trainer.train()
    n_params = sum(p.numel() for p in model.parameters())
    per_step = micro * accumulation
    real = float(rows.num_tokens[:per_step * steps].sum()) / steps  # rows in order: about the same per step
    out.put({"times": times, "tokens_per_step": real, "n_params": n_params,
             "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "peak_flops": gpu_peak(cuda),
             "attention": best_attention(cuda)})


def profile_raysft(prepared_dir: str, model_dir: str, micro: int, cuda: bool) -> list[str]:
    """Top 5 kernels by device time over 3 steps of raysft's model, loss and attention (no Ray, one process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from raysft import loss
    from raysft.data.prepared import PreparedRows
    from raysft.modeling import build_model, collate

    rows = PreparedRows(prepared_dir)
    device = "cuda" if cuda else "cpu"
    model = build_model(model_dir, 0, from_scratch=True, dtype="bf16" if cuda else "fp32", attn_implementation=best_attention(cuda))
    loss.attach(model, "chunked")
    model.to(device).train()
    batches = [collate(rows.get(list(range(i * micro, (i + 1) * micro))), 0, device) for i in range(4)]
    loss.loss_sum(model, batches[0]).backward()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for b in batches[1:]:
            loss.loss_sum(model, b).backward()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=5)
    return table.splitlines()


def bench_shape(work: str, shape: str, data: str, steps: int, cuda: bool) -> dict:
    import ray

    from raysft.config import load_config
    from raysft.prepare import prepare
    from raysft.train.launch import train
    from raysft.train.metrics import read_metrics

    model_dir = model_folder(work, shape)
    micro, accumulation = (4, 4) if cuda else (1, 2)
    seq = 2048 if cuda else 256
    common = [f"data.train_files={data}", f"data.max_seq_len={seq}", f"model.name_or_path={model_dir}",
              "model.from_scratch=true", "model.attn_implementation=auto", f"train.micro_batch_size={micro}",
              f"train.global_batch_size={micro * accumulation}", f"train.max_steps={steps}",
              f"train.dtype={'bf16' if cuda else 'fp32'}", "train.zero_stage=2", "train.gradient_checkpointing=false",
              "train.fused_loss=chunked", "train.prefetch_batches=2", "cluster.num_workers=1",
              f"cluster.use_gpu={'true' if cuda else 'false'}", "checkpoint.every_steps=0", "train.log_every_steps=1"]
    cfg = load_config(None, [f"output_dir={work}/raysft-{shape}", *common])
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR")
    prepared, _ = prepare(cfg)
    train(None, [], cfg=cfg)
    ms = read_metrics(cfg.output_dir)[WARMUP if steps > WARMUP + 2 else 0:]
    raysft = {"tokens_per_s": statistics.median(m["tokens_per_s"] for m in ms),
              "mfu": statistics.median(m.get("mfu", 0.0) for m in ms),
              "peak_gb": max(m.get("gpu_memory_gb", 0.0) for m in ms),
              "data_wait": statistics.median(m["data_wait"] for m in ms)}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=run_trl, args=(prepared, model_dir, steps, micro, accumulation,
                                          cuda, q))
    p.start()
    trl = q.get()
    p.join()
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model_dir)
    t = statistics.median(trl["times"][WARMUP if steps > WARMUP + 2 else 0:])
    trl_tps = trl["tokens_per_step"] / t
    fpt = flops_per_token(trl["n_params"], mc.num_hidden_layers, mc.hidden_size, seq)
    trl_mfu = trl_tps * fpt / trl["peak_flops"] if trl["peak_flops"] else 0.0
    return {"shape": shape, "raysft": raysft, "trl": {"tokens_per_s": trl_tps, "mfu": trl_mfu,
                                                       "peak_gb": trl["peak_gb"], "attention": trl["attention"]},
            "profile": profile_raysft(prepared, model_dir, micro, cuda)}


def main(steps: int, shapes: list[str], smoke: bool) -> None:
    import torch

    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        sys.exit("bench/train.py gpu: no CUDA device here (use --smoke to check the script on CPU)")
    shapes = ["smoke"] if smoke else shapes
    steps = 3 if smoke else steps
    where = torch.cuda.get_device_name() if cuda else "CPU (smoke)"
    with tempfile.TemporaryDirectory(prefix="raysft-gpu-bench-") as work:
        data = long_chats(work, 6000 if cuda else 200)
        for shape in shapes:
            r = bench_shape(work, shape, data, steps, cuda)
            a, b = r["raysft"], r["trl"]
            print(f"{where}, Qwen2-{shape} shape, {steps} steps, attention {b['attention']}:")
            print(f"  raysft: {a['tokens_per_s']:.0f} tokens/s, MFU {a['mfu']:.1%}, peak {a['peak_gb']:.1f} GiB, "
                  f"data_wait {a['data_wait']:.1%}")
            print(f"  TRL:    {b['tokens_per_s']:.0f} tokens/s, MFU {b['mfu']:.1%}, "
                  f"peak {b['peak_gb'] or 0:.1f} GiB")
            print(f"  ratio raysft/TRL: tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f} (goal >= 1.2), "
                  f"peak memory {a['peak_gb'] / b['peak_gb'] if b['peak_gb'] else float('nan'):.2f} (goal <= 1)")
            print("  raysft's top 5 kernels:")
            for line in r["profile"]:
                print("   ", line)
