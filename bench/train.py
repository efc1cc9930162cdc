"""Benchmark raysft training: overhead against a bare DeepSpeed loop, padding waste, and GPU throughput/MFU.

    python bench/train.py overhead     # CPU: raysft worker vs bare DeepSpeed over torch.distributed (no Ray)
    python bench/train.py padding      # real tokens / processed tokens, packed vs padded, on the sample data
    python bench/train.py backends     # CPU: fsdp against deepspeed ZeRO-2 and ZeRO-3, step time and peak memory
    python bench/train.py gpu          # GPU: raysft vs TRL SFTTrainer, Qwen2 0.5B/1.5B shapes (bench/gpu.py)
    python bench/train.py preemption   # CPU: the preemption ask at every step against never, step time

overhead: the same model (Llama, hidden 256, 4 layers), the same prepared rows in the same order, the same
batch (2 workers x micro-batch 2 x accumulation 2), ZeRO-2, fp32, one thread per worker. The peer is the loop
a user writes by hand: `torch.multiprocessing` + gloo + `deepspeed.initialize`, model(...).loss, backward, step.
Both report the median step time over the steps after warm-up; the ratio is raysft / bare.

backends: raysft's deepspeed and fsdp backends at zero_stage 2 and 3 on the same rows in one run, each a
`raysft train` of a larger model (Llama, hidden 512, 8 layers, ~27M parameters: the optimizer state dominates
memory), 2 workers, fp32: the median step time after warm-up and each worker's peak RSS (the kernel's high-water
mark, `ru_maxrss`, read as training ends), with their ratios against deepspeed at the same stage.

preemption: the cost of asking Ray Train for a preemption notice (`ray.train.get_preemption_info`, a barrier over
the workers through the run's synchronization actor). The overhead model trained twice per variant, alternating:
asking at every step (`RAYSFT_PREEMPTION_ASK_S=0`) and asking once (the first step only); the median step time
after warm-up, and their ratio. raysft's default asks at most every 2 s, so a step pays this at most once in 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYSFT_DASHBOARD", "0")
SAMPLE = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")
WARMUP = 5


def bench_model_dir(work: str, **overrides) -> str:
    from make_assets import make_tokenizer, tiny_llama_config

    path = os.path.join(work, "model")
    tok = make_tokenizer()
    tok.save_pretrained(path)
    tiny_llama_config(len(tok), **overrides).save_pretrained(path)
    return path


def overrides(work: str, model_dir: str, steps: int, name: str, log_every: int = 1) -> list[str]:
    return [f"output_dir={os.path.join(work, name)}", f"data.train_files={SAMPLE}", "data.max_seq_len=512",
            f"model.name_or_path={model_dir}", "model.from_scratch=true", "train.micro_batch_size=2",
            "train.global_batch_size=8", f"train.max_steps={steps}", "train.dtype=fp32", "train.zero_stage=2",
            "train.lr=1e-3", "cluster.num_workers=2", "checkpoint.every_steps=0", f"train.log_every_steps={log_every}"]


def _bare_worker(rank: int, world: int, port: int, prepared: str, model_dir: str, steps: int, out: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from raysft.data.prepared import PreparedRows
    from raysft.modeling import build_model, collate
    from raysft.train.schedule import BatchShape, Schedule

    torch.set_num_threads(1)  # as Ray gives each 1-CPU worker
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = PreparedRows(prepared)
    schedule = Schedule(len(rows), 8, 42, 1, steps)
    model = build_model(model_dir, 386, from_scratch=True, seed=42)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), dist_init_required=False,
                                      config={"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                              "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
                                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                                              "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 1.0,
                                              "steps_per_print": 2**31 - 1})
    times = []
    for step in range(steps):
        t0 = time.time()
        for micro in schedule.rank_micro_batches(step, rank, BatchShape(8, 2, world)):
            batch = collate(rows.get(micro), 0)
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
        dist.barrier()
        times.append(time.time() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def _cpu_seconds() -> dict:
    """pid -> (user+system CPU seconds, process title) for this process and all its descendants (Ray's too)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            title = (p.cmdline() or [p.name()])[0].split("/")[-1][:40]
            out[p.pid] = (t.user + t.system, title)
        except psutil.Error:
            pass
    return out


def overhead(steps: int, log_every: int) -> None:
    import socket

    import ray
    import torch.multiprocessing as mp

    from raysft.config import load_config
    from raysft.train.launch import train
    from raysft.train.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="raysft-bench-") as work:
        model_dir = bench_model_dir(work, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
        cfg = load_config(None, overrides(work, model_dir, steps, "raysft", log_every))
        before = _cpu_seconds()
        t = time.time()
        train(None, [], cfg=cfg, log=lambda s: None)
        wall_raysft = time.time() - t
        after = _cpu_seconds()
        logged = read_metrics(cfg.output_dir)
        ours = [m["step_time"] for m in logged if m["step"] > WARMUP]
        steady = [m for m in logged if m["step"] >= WARMUP]  # wall clock between logged steps: what a run costs
        wall_ours = (steady[-1]["time"] - steady[0]["time"]) / (steady[-1]["step"] - steady[0]["step"])
        prepared_root = os.path.join(cfg.output_dir, "prepared")
        prepared = os.path.join(prepared_root, os.listdir(prepared_root)[0])
        ray.shutdown()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(work, "bare.json")
        t = time.time()
        mp.spawn(_bare_worker, args=(2, port, prepared, model_dir, steps, out), nprocs=2, join=True)
        wall_bare = time.time() - t
        with open(out) as f:  # the same steps as raysft logged (1-based step k is index k-1)
            all_bare = json.load(f)
            bare = [t for k, t in enumerate(all_bare, 1) if k > WARMUP and k % log_every == 0]
            wall_bare_step = statistics.mean(all_bare[WARMUP:])
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    print(f"logging/reporting every {log_every} steps; median step time over {len(ours)} steps: raysft {m_ours * 1000:.1f} ms, bare DeepSpeed {m_bare * 1000:.1f} ms")
    print(f"ratio raysft/bare: {m_ours / m_bare:.3f} (goal <= 1.05)")
    print(f"wall clock per step after warm-up (logging, reporting and checkpoint waits included): raysft "
          f"{wall_ours * 1000:.1f} ms, bare DeepSpeed {wall_bare_step * 1000:.1f} ms, ratio {wall_ours / wall_bare_step:.3f}")
    others = {}  # Train workers have exited by now; everything else of Ray is still alive
    for k, (v, name) in after.items():
        if "RayTrainWorker" not in name and k != os.getpid():
            others[name] = others.get(name, 0.0) + v - before.get(k, (0, ""))[0]
    top = ", ".join(f"{n} {s:.1f}" for n, s in sorted(others.items(), key=lambda x: -x[1])[:5])
    print(f"CPU seconds used by Ray's other processes during the raysft command ({wall_raysft:.0f}s on "
          f"{os.cpu_count()} cores): {sum(others.values()):.1f} ({top})")
    print(f"whole command: raysft {wall_raysft:.1f}s (Ray workers, prepare reuse, checkpoint, export), "
          f"bare {wall_bare:.1f}s (training only)")


def _peak_rss_hooks(out: str):
    """Worker hooks that write each rank's peak RSS (bytes) to `{out}.rank{r}` when training ends."""
    from raysft.train.hooks import WorkerHooks

    class PeakRss(WorkerHooks):  # defined here: pickled by value to the workers
        def finished(self, forward, rows, rank, device) -> None:
            import resource

            with open(f"{out}.rank{rank}", "w") as f:
                f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))

    return PeakRss()


def backends(steps: int) -> None:
    import ray

    from raysft.config import load_config
    from raysft.train.launch import train
    from raysft.train.metrics import read_metrics

    runs = [("deepspeed", 2), ("fsdp", 2), ("deepspeed", 3), ("fsdp", 3)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="raysft-bench-") as work:
        model_dir = bench_model_dir(work, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=4)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
        prepared = os.path.join(work, "prepared")  # prepared once, by the first run; the same rows for all
        for backend, stage in runs:
            name = f"{backend}-{stage}"
            cfg = load_config(None, overrides(work, model_dir, steps, name) + [
                f"train.backend={backend}", f"train.zero_stage={stage}", f"data.prepared_path={prepared}"])
            peak = os.path.join(work, f"{name}.rss")
            train(None, [], cfg=cfg, log=lambda s: None, hooks=_peak_rss_hooks(peak))
            logged = read_metrics(cfg.output_dir)
            rss = [int(open(f"{peak}.rank{r}").read()) for r in range(2)]
            results[(backend, stage)] = (statistics.median(m["step_time"] for m in logged if m["step"] > WARMUP),
                                         max(rss), logged[-1]["loss"])
        ray.shutdown()
    print(f"{steps} steps, 2 workers x 2 rows x 2 accumulation, fp32, median step time after {WARMUP} warm-up steps, "
          "peak RSS of the larger worker")
    for (backend, stage), (step_s, rss, loss) in results.items():
        ds_step, ds_rss, _ = results[("deepspeed", stage)]
        print(f"  {backend:<9} zero_stage {stage}: step {step_s * 1000:7.1f} ms ({step_s / ds_step:.2f}x deepspeed), "
              f"peak RSS {rss / 2**20:6.0f} MiB ({rss / ds_rss:.2f}x deepspeed), last loss {loss:.4f}")


def padding() -> None:
    import ray

    from raysft.config import load_config
    from raysft.data.prepared import PreparedRows
    from raysft.prepare import prepare
    from raysft.train.schedule import BatchShape, Schedule

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="raysft-bench-") as work:
        model_dir = bench_model_dir(work)
        for packing in (True, False):
            cfg = load_config(None, overrides(work, model_dir, 1, f"p{packing}") + [f"data.packing={packing}"])
            path, m = prepare(cfg, log=lambda s: None)
            rows = PreparedRows(path)
            s = Schedule(len(rows), 8, 42, epochs=1)
            real = processed = 0
            for step in range(s.total_steps):  # exactly what collate processes: each micro-batch padded to its longest
                for rank in range(2):
                    for micro in s.rank_micro_batches(step, rank, BatchShape(8, 2, 2)):
                        lengths = rows.num_tokens[micro]
                        real += int(lengths.sum())
                        processed += int(lengths.max()) * len(micro)
            print(f"packing={str(packing).lower():<5} rows={m['rows']:>5} real/processed tokens = {real / processed:.3f}"
                  f" (stored rows vs max_seq_len: {1 - m['padding_fraction']:.3f})")
    ray.shutdown()


def preemption(steps: int) -> None:
    import ray

    from raysft.config import load_config
    from raysft.train.launch import train
    from raysft.train.metrics import read_metrics

    medians: dict = {"every step": [], "once": []}
    with tempfile.TemporaryDirectory(prefix="raysft-bench-") as work:
        model_dir = bench_model_dir(work, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4)
        for i, variant in enumerate(["every step", "once"] * 2):
            os.environ["RAYSFT_PREEMPTION_ASK_S"] = "0" if variant == "every step" else "1e9"
            ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")  # the workers inherit it
            cfg = load_config(None, overrides(work, model_dir, steps, f"run{i}"))
            train(None, [], cfg=cfg, log=lambda s: None)
            ray.shutdown()
            medians[variant].append(statistics.median(m["step_time"] for m in read_metrics(cfg.output_dir)
                                                      if m["step"] > WARMUP))
    every, once = statistics.mean(medians["every step"]), statistics.mean(medians["once"])
    print(f"median step time, asking at every step: {every * 1000:.1f} ms "
          f"({', '.join(f'{x * 1000:.1f}' for x in medians['every step'])}); asking once: {once * 1000:.1f} ms "
          f"({', '.join(f'{x * 1000:.1f}' for x in medians['once'])})")
    print(f"ratio every step / once: {every / once:.3f}; the ask's cost per step: {(every - once) * 1000:.1f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["overhead", "padding", "backends", "gpu", "preemption"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=1, help="overhead: raysft's train.log_every_steps")
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"], help="gpu: Qwen2 shapes (0.5b, 1.5b)")
    ap.add_argument("--smoke", action="store_true", help="gpu: a tiny shape on CPU for 3 steps (checks the script)")
    args = ap.parse_args()
    if args.what == "gpu":
        sys.path.insert(0, HERE)
        from gpu import main as gpu_main  # bench/gpu.py

        gpu_main(args.steps, args.shapes, args.smoke)
    else:
        {"overhead": lambda: overhead(args.steps, args.log_every), "padding": padding,
         "backends": lambda: backends(args.steps), "preemption": lambda: preemption(args.steps)}[args.what]()
