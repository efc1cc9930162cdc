"""The DeepSpeed worker: one Ray Train worker function that reads top to bottom — set up, restore, loop, report.

Loss: every micro-batch contributes the *sum* of its trained tokens' cross-entropy divided by the number
of trained tokens in the whole global batch (all micro-batches, all workers). That count is known to every
rank without communication, because the global batch is a pure function of the step (see `schedule`).
DeepSpeed averages gradients over ranks, so each micro-batch's loss is multiplied by the world size and
not divided by the accumulation steps: the update is exactly that of the mean over the global batch,
whatever the packing, accumulation and worker count.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time

import numpy as np

# bf16 dense peak FLOP/s by GPU name, for MFU
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
                 "B200": 2250e12}


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(train, use_gpu: bool, world_size: int) -> dict:
    """DeepSpeed config generated from `train.*`, with the user's `train.deepspeed_config` merged over it."""
    accumulation = train.global_batch_size // (train.micro_batch_size * world_size)
    zero = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.dtype == "bf16"},
        "fp16": {"enabled": train.dtype == "fp16", "loss_scale": 0},
        # torch's AdamW: no fused/CPU-Adam extension to compile; the same optimizer as the hf backend
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                  "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
    }
    return deep_merge(config, train.deepspeed_config)


def _rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train_loop(job: dict) -> None:
    """Ray Train entry point. `job`: {"config": resolved config dict, "prepared": folder, "fingerprint": ...}."""
    # ------------------------------------------------------------------ setup
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from raysft import checkpoint as ckpt
    from raysft.config import from_dict, to_yaml
    from raysft.modeling import build_model, collate, token_loss_sum
    from raysft.train.metrics import MetricsWriter, step_line
    from raysft.train.rows import PreparedRows
    from raysft.train.schedule import Schedule

    cfg = from_dict(job["config"])
    t, c = cfg.train, cfg.cluster
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not c.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    device = ray.train.torch.get_device() if c.use_gpu else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(job["prepared"], "tokenizer"))
    rows = PreparedRows(job["prepared"])
    schedule = Schedule(len(rows), t.global_batch_size, t.seed, t.epochs, t.max_steps)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model.name_or_path, len(tokenizer), from_scratch=cfg.model.from_scratch, seed=t.seed,
                        dtype=t.dtype, attn_implementation=cfg.model.attn_implementation,
                        trust_remote_code=cfg.model.trust_remote_code,
                        gradient_checkpointing=t.gradient_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    ds_config = deepspeed_config(t, c.use_gpu, world)
    run_dir = os.path.join(cfg.checkpoint.storage_path, cfg.run_name)
    good = ckpt.latest_good(run_dir, warn=log)
    universal = job.get("universal")  # the driver converted a checkpoint of another worker count (launch.py)
    universal = universal if universal and good == universal["checkpoint"] else None
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, config=ds_config, dist_init_required=False,
        model_parameters=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr_scheduler=lambda opt: get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else
                                               "constant_with_warmup", opt, num_warmup_steps=t.warmup_steps,
                                               num_training_steps=schedule.total_steps))
    log(f"setup: {n_params / 1e6:.2f}M parameters, {len(rows)} rows, {schedule.steps_per_epoch} steps/epoch, "
        f"{schedule.total_steps} steps, {world} workers x {t.micro_batch_size} rows x "
        f"{ds_config['gradient_accumulation_steps']} accumulation = {t.global_batch_size} rows/step, "
        f"ZeRO-{t.zero_stage}, {t.dtype}")

    # ------------------------------------------------------------------ restore
    start_step, samples_seen, tokens_seen = 0, 0, 0
    resumed_from = 0
    if good is not None:
        state = ckpt.read_state(good)
        if universal:  # written by another number of workers: DeepSpeed re-partitions the optimizer state
            engine.load_checkpoint(universal["load_dir"], tag=universal["tag"], load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        else:
            engine.load_checkpoint(os.path.join(good, "model"), load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        rng_file = os.path.join(good, "rng", f"rank{rank}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
        start_step, samples_seen, tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        resumed_from = start_step
        log(f"resume: from {good} at step {start_step} (epoch {state['epoch']}, {samples_seen} rows seen"
            + (f", written by {state['world_size']} workers, loaded as a universal checkpoint)" if universal else ")"))

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(step: int, metrics: dict, final: bool) -> None:
        local = tempfile.mkdtemp(prefix="raysft-ckpt-")
        engine.save_checkpoint(os.path.join(local, "model"), tag=f"step{step}")
        if job.get("pause_in_checkpoint_step") == step and rank == job.get("fail_rank", 0):
            marker = os.path.join(cfg.output_dir, f".paused-in-checkpoint-step{step}")
            if not os.path.exists(marker):  # tests only: hold still, half-written, until killed (pid in marker)
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(300)
        os.makedirs(os.path.join(local, "rng"))
        torch.save(_rng_state(), os.path.join(local, "rng", f"rank{rank}.pt"))
        if final:  # logits of a fixed input, so that export can be checked against the trained model
            probe = torch.tensor([rows.get([0])["input_ids"][0][:64]], device=device)
            engine.module.eval()
            with torch.no_grad():
                logits = engine(input_ids=probe, use_cache=False).logits.float().cpu()
            engine.module.train()
            if rank == 0:
                torch.save({"input_ids": probe.cpu(), "logits": logits}, os.path.join(local, "probe.pt"))
        if rank == 0:
            engine.module.config.save_pretrained(os.path.join(local, "model"))
            with open(os.path.join(local, ckpt.STATE), "w", encoding="utf-8") as f:
                json.dump({"step": step, "epoch": schedule.epoch_of(max(step - 1, 0)), "samples_seen": samples_seen,
                           "tokens_seen": tokens_seen, "seed": t.seed, "fingerprint": job["fingerprint"],
                           "world_size": world, "backend": "deepspeed", "zero_stage": t.zero_stage,
                           "total_steps": schedule.total_steps, "global_batch_size": t.global_batch_size,
                           "final": final}, f, indent=1)
            with open(os.path.join(local, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(to_yaml(cfg))
            shutil.copytree(os.path.join(job["prepared"], "tokenizer"), os.path.join(local, "tokenizer"))
        ckpt.write_rank_files(local, rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(local), checkpoint_dir_name=ckpt.dir_name(step))
        if rank == 0:  # committed = every rank's files are in storage; only then is the manifest written
            reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            path = next(r.checkpoint.path for r in reported if r.checkpoint.path.endswith(ckpt.dir_name(step)))
            ckpt.commit(path, world)
            log(f"checkpoint: step {step} committed at {path}")
            ckpt.prune(run_dir, cfg.checkpoint.keep, log)
        shutil.rmtree(local, ignore_errors=True)

    # ------------------------------------------------------------------ loop
    writer = MetricsWriter(cfg.output_dir) if rank == 0 else None
    fail_after = job.get("fail_after_step", 0)  # tests only: see launch.FAIL_AFTER_STEP
    peak = next((v for k, v in GPU_PEAK_BF16.items() if c.use_gpu and k in torch.cuda.get_device_name()), None)
    t_start, steps_timed = time.time(), 0
    engine.train()
    for step in range(start_step + 1, schedule.total_steps + 1):
        t0 = time.time()
        global_rows = schedule.global_batch(step - 1)
        n_trained = int(rows.num_trained[global_rows].sum())
        data_time, loss_sum, processed = 0.0, torch.zeros((), device=device), 0
        for micro in schedule.rank_micro_batches(step - 1, rank, world, t.micro_batch_size):
            td = time.time()
            batch = collate(rows.get(micro), tokenizer.pad_token_id, device)
            data_time += time.time() - td
            logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            loss = token_loss_sum(logits, batch["labels"]) / n_trained
            engine.backward(loss * world, scale_wrt_gas=False)
            engine.step()
            loss_sum += loss.detach()
            processed += batch["input_ids"].numel()
        stats = torch.tensor([loss_sum.item(), processed, data_time], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        real_tokens = int(rows.num_tokens[global_rows].sum())
        samples_seen += len(global_rows)
        tokens_seen += real_tokens
        step_time = time.time() - t0
        steps_timed += 1
        metrics = {"step": step, "total_steps": schedule.total_steps, "epoch": schedule.epoch_of(step - 1),
                   "loss": stats[0].item(), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "tokens_per_s": real_tokens / step_time, "padding_fraction": 1 - real_tokens / stats[1].item(),
                   "data_wait": stats[2].item() / world / step_time, "step_time": step_time,
                   "eta_s": (time.time() - t_start) / steps_timed * (schedule.total_steps - step),
                   "samples_seen": samples_seen, "tokens_seen": tokens_seen, "resumed_from": resumed_from}
        if peak:
            flops_per_token = 6 * n_params + 6 * model.config.num_hidden_layers * model.config.hidden_size * \
                stats[1].item() / len(global_rows)
            metrics["mfu"] = real_tokens / step_time * flops_per_token / (peak * world)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: loss is {metrics['loss']}. fix: lower train.lr, or use bf16/fp32")
        final = step == schedule.total_steps
        checkpoint_due = final or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
        if step % t.log_every_steps == 0 or checkpoint_due or step == start_step + 1:
            log(step_line(metrics))
            if writer:
                writer.write(metrics)
        if checkpoint_due:
            save_checkpoint(step, metrics, final)
        elif step % t.log_every_steps == 0:
            ray.train.report(metrics)
        if fail_after == step and rank == job.get("fail_rank", 0):
            marker = os.path.join(cfg.output_dir, f".injected-failure-step{step}")
            if not os.path.exists(marker):  # once per run: the resumed attempt goes through
                open(marker, "w").close()
                raise RuntimeError(f"raysft test: injected failure after step {step}")
    if writer:
        writer.close()
