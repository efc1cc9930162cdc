"""The DeepSpeed worker: one Ray Train worker function that reads top to bottom — set up, restore, loop, report.

Loss: every micro-batch contributes the *sum* of its trained tokens' cross-entropy divided by the number
of trained tokens in the whole global batch (all micro-batches, all workers). That count is known to every
rank without communication, because the global batch is a pure function of the step (see `schedule`).
DeepSpeed averages gradients over ranks, so each micro-batch's loss is multiplied by the world size and
not divided by the accumulation steps: the update is exactly that of the mean over the global batch,
whatever the packing, accumulation and worker count.
"""

from __future__ import annotations

import os
import random
import tempfile
import time

import numpy as np


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

    from raysft import checkpoint as ckpt
    from raysft.modeling import collate, param_groups, token_loss_sum
    from raysft.train import common
    from raysft.train.metrics import MetricsWriter

    w = common.setup(job)
    cfg, t, c, rank, world, log = w.cfg, w.t, w.c, w.rank, w.world, w.log
    tokenizer, rows, schedule, model, run_dir = w.tokenizer, w.rows, w.schedule, w.model, w.run_dir
    n_params, n_trainable = w.counts
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import get_scheduler

    device = ray.train.torch.get_device() if c.use_gpu else torch.device("cpu")
    ds_config = deepspeed_config(t, c.use_gpu, world)
    good = ckpt.latest_good(run_dir, warn=log)
    state = ckpt.read_state(good) if good is not None else None
    universal = job.get("universal")  # the driver converted a checkpoint of another worker count (launch.py)
    universal = universal if universal and good == universal["checkpoint"] else None
    if state is not None and universal is None:
        if state["world_size"] != world and state.get("zero_stage", 0) >= 1:  # elastic mode restarted on another size
            from raysft.train.launch import to_universal, universal_location

            if rank == 0:
                to_universal(good, state, cfg.output_dir, world, log)
            dist.barrier()
            universal = universal_location(good, state, cfg.output_dir)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, config=ds_config, dist_init_required=False,
        model_parameters=param_groups(model, t.weight_decay),
        lr_scheduler=lambda opt: get_scheduler(common.lr_scheduler_name(t.lr_scheduler), opt,
                                               num_warmup_steps=t.warmup_steps,
                                               num_training_steps=schedule.total_steps))
    log(common.setup_line(n_params, n_trainable, t.lora.r, len(rows), schedule, world, t.micro_batch_size,
                          ds_config["gradient_accumulation_steps"], t.zero_stage, t.dtype, "deepspeed"))

    # ------------------------------------------------------------------ restore
    start_step, samples_seen, tokens_seen = 0, 0, 0
    lora = bool(t.lora.r)  # checkpoints hold the adapter only: the frozen base is the model folder's
    if state is not None:
        if universal:  # written by another number of workers: DeepSpeed re-partitions the optimizer state
            engine.load_checkpoint(universal["load_dir"], tag=universal["tag"], load_optimizer_states=True,
                                   load_lr_scheduler_states=True, load_module_strict=not lora)
        else:
            engine.load_checkpoint(os.path.join(good, "model"), load_optimizer_states=True,
                                   load_lr_scheduler_states=True, load_module_strict=not lora)
        rng_file = os.path.join(good, "rng", f"rank{rank}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
        start_step, samples_seen, tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        log(f"resume: from {good} at step {start_step} (epoch {state['epoch']}, {samples_seen} rows seen"
            + (f", written by {state['world_size']} workers, loaded as a universal checkpoint)" if universal else ")"))

    def forward(batch):
        return engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(step: int, metrics: dict, final: bool) -> None:
        local = tempfile.mkdtemp(prefix="raysft-ckpt-")
        engine.save_checkpoint(os.path.join(local, "model"), tag=f"step{step}", exclude_frozen_parameters=lora)
        os.makedirs(os.path.join(local, "rng"))
        torch.save(_rng_state(), os.path.join(local, "rng", f"rank{rank}.pt"))
        if final:
            engine.module.eval()
            probe = common.probe(forward, rows, device)
            engine.module.train()
        if rank == 0:
            if final:
                torch.save(probe, os.path.join(local, "probe.pt"))
            (engine.module.get_base_model() if lora else engine.module).config.save_pretrained(
                os.path.join(local, "model"))
            common.write_run_files(local, cfg, job, common.checkpoint_state(w, job, steps, step, "deepspeed"))
        common.report_checkpoint(local, step, metrics, w, job, gate)

    # ------------------------------------------------------------------ loop
    writer = MetricsWriter(cfg.output_dir) if rank == 0 else None
    steps = common.StepMetrics(schedule, rows, world, n_params, model.config, common.gpu_peak(c.use_gpu), start_step,
                               samples_seen, tokens_seen)
    gate = common.ReportGate(rank)
    engine.train()
    for step in range(start_step + 1, schedule.total_steps + 1):
        t0 = time.time()
        n_trained = common.trained_tokens(rows, schedule, step)
        data_time, loss_sum, processed = 0.0, torch.zeros((), device=device), 0
        for micro in schedule.rank_micro_batches(step - 1, rank, world, t.micro_batch_size):
            td = time.time()
            batch = collate(rows.get(micro), tokenizer.pad_token_id, device)
            data_time += time.time() - td
            loss = token_loss_sum(forward(batch), batch["labels"]) / n_trained
            engine.backward(loss * world, scale_wrt_gas=False)
            engine.step()
            loss_sum += loss.detach()
            processed += batch["input_ids"].numel()
        stats = torch.tensor([loss_sum.item(), processed, data_time, gate.vote()], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        metrics = steps(step, stats[0].item(), stats[1].item(), stats[2].item(), time.time() - t0,
                        scheduler.get_last_lr()[0], float(engine.get_global_grad_norm() or 0.0))
        final = step == schedule.total_steps
        checkpoint_due = common.eval_and_log(metrics, w, forward, engine, device, start_step, writer)
        if checkpoint_due:
            save_checkpoint(step, metrics, final)
        elif step % t.log_every_steps == 0 or "eval_loss" in metrics:
            gate.report(metrics, stats[3].item())
        common.maybe_fail(job, cfg, step, rank)
    if writer:
        writer.close()
