"""The DeepSpeed worker: one Ray Train worker function that reads top to bottom — start, restore, loop, end.

Loss: every micro-batch contributes the *sum* of its trained tokens' cross-entropy divided by the number
of trained tokens in the whole global batch (all micro-batches, all workers). That count is known to every
rank without communication, because the global batch is a pure function of the step (see `schedule`).
DeepSpeed averages gradients over ranks, so each micro-batch's loss is multiplied by the world size and
not divided by the accumulation steps: the update is exactly that of the mean over the global batch,
whatever the packing, accumulation and worker count.
"""

from __future__ import annotations

import tempfile
import time
from typing import Optional

from raysft import checkpoint as ckpt
from raysft.train import context, resize
from raysft.train.context import Worker, WorkerJob
from raysft.train.metrics import setup_line
from raysft.train.optim import deepspeed_config, lr_scheduler_name
from raysft.train.report import ReportGate

BACKEND = "deepspeed"


def resume_point(w: Worker) -> tuple[Optional[str], Optional[ckpt.RunState], Optional[resize.Universal]]:
    """The checkpoint to resume from, its state, and its universal form when it was written by another number of
    workers (converted by the driver, or here by rank 0 when an elastic run restarted on another size)."""
    import torch.distributed as dist

    good = ckpt.latest_good(w.run_dir, warn=w.log)
    if good is None:
        return None, None, None
    state = ckpt.read_state(good)
    if w.job.universal is not None and w.job.universal.checkpoint == good:
        return good, state, w.job.universal
    if state.world_size == w.world or state.zero_stage == 0:
        return good, state, None
    if w.rank == 0:
        resize.to_universal(good, state, w.cfg.output_dir, w.world, w.log)
    dist.barrier()
    return good, state, resize.location(good, state, w.cfg.output_dir)


def save_checkpoint(engine, w: Worker, step: int, state: ckpt.RunState, metrics: dict, gate: ReportGate) -> None:
    """Every rank's engine state and RNG, rank 0's run files; then report and commit (report.py)."""
    lora = state.lora  # the adapter only: the frozen base is the model folder's
    local = tempfile.mkdtemp(prefix="raysft-ckpt-")
    engine.save_checkpoint(ckpt.model_dir(local), tag=ckpt.deepspeed_tag(step), exclude_frozen_parameters=lora)
    w.commit_checkpoint(local, engine.module, step, state, metrics, gate)


def long_rows(w: Worker, device):
    """Sequence parallelism, tiled MLP and activation offload, as configured (sequence_parallel.py); the
    SequenceParallel that slices each step's micro-batches, or None."""
    t = w.cfg.train
    if not (t.sequence_parallel_size > 1 or t.tiled_mlp or t.offload_activations):
        return None
    from raysft.train import sequence_parallel

    sp = None
    if t.sequence_parallel_size > 1:
        sp = sequence_parallel.setup(w.model, t.sequence_parallel_size, 1 if w.flat else t.micro_batch_size, device,
                                     w.tokenizer.pad_token_id)
        w.log(f"sequence parallel: {w.world // sp.size} group(s) of {sp.size} workers; each row split in {sp.size} "
              "along the sequence (DeepSpeed's Ulysses attention)")
    if t.tiled_mlp:
        w.log(f"tiled MLP: {sequence_parallel.tile_mlp(w.model)} MLPs computed a slice of the sequence at a time")
    if t.offload_activations:
        sequence_parallel.offload_activations(w.model)
        w.log("activation checkpointing: each decoder layer's input kept in CPU memory until backward")
    return sp


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point. `loop_config["job"]`: the `WorkerJob` from launch.fit."""
    # ------------------------------------------------------------------ start
    job: WorkerJob = loop_config["job"]
    w = context.start(job, backend_prefetches=True)
    cfg, t, rank, world, rows, schedule = w.cfg, w.cfg.train, w.rank, w.world, w.rows, w.schedule
    import deepspeed
    import torch
    from transformers import get_scheduler

    from raysft.loss import loss_sum
    from raysft.modeling import param_groups
    from raysft.train.prefetch import Prefetcher

    device = context.device(cfg.cluster.use_gpu)
    sp = long_rows(w, device)
    good, state, universal = resume_point(w)
    ds_config = deepspeed_config(t, cfg.cluster.use_gpu, w.shape)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(
        model=w.model, config=ds_config, dist_init_required=False,
        model_parameters=param_groups(w.model, t.weight_decay),
        lr_scheduler=lambda opt: get_scheduler(lr_scheduler_name(t.lr_scheduler), opt,
                                               num_warmup_steps=t.warmup_steps,
                                               num_training_steps=schedule.total_steps))
    if t.compile:
        engine.compile()  # torch.compile through DeepSpeed (its ZeRO hooks stay in place)
    w.log(setup_line(w.n_params, w.n_trainable, t.lora.r, len(rows), schedule, w.shape, f"ZeRO-{t.zero_stage}", t.dtype,
                     BACKEND))

    def logits(batch):
        return engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    # ------------------------------------------------------------------ restore
    start_step = 0
    if state is not None:
        load_dir, tag = (universal.load_dir, universal.tag) if universal else (ckpt.model_dir(good), None)
        engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                               load_module_strict=not t.lora.r)  # a LoRA checkpoint holds the adapter only
        ckpt.restore_rng(good, rank)
        start_step = state.step
        w.log(f"resume: from {good} at step {start_step} (epoch {state.epoch}, {state.samples_seen} rows seen"
              + (f", written by {state.world_size} workers, loaded as a universal checkpoint)" if universal else ")"))

    # ------------------------------------------------------------------ loop
    steps = w.step_metrics(state)
    step_log = w.open_step_log(start_step, state)
    gate = ReportGate(rank)

    def save(step: int, metrics: dict) -> None:
        save_checkpoint(engine, w, step, w.run_state(step, steps, BACKEND), metrics, gate)

    engine.train()
    batches = Prefetcher(rows, schedule, rank, w.shape, start_step, w.tokenizer.pad_token_id, device,
                         t.prefetch_batches, multiple=t.sequence_parallel_size, flat=w.flat)
    t0 = time.time()
    for item in batches:  # step start_step + 1, ... in the schedule's order
        step_loss, processed = torch.zeros((), device=device), 0
        for batch in sp.shard(item.micro_batches) if sp else item.micro_batches:
            loss = loss_sum(engine, batch) / item.n_trained  # the global batch's mean, this micro-batch's part
            engine.backward(loss * world, scale_wrt_gas=False)
            engine.step()
            step_loss += loss.detach()
            processed += batch["input_ids"].numel()
        w.end_step(item, step_loss, processed, t0, scheduler.get_last_lr()[0], engine.get_global_grad_norm() or 0.0,
                   steps, step_log, gate, engine, engine.module, save, device)
        t0 = time.time()

    # ------------------------------------------------------------------ end
    engine.eval()
    job.hooks.finished(logits, rows, rank, device)
    step_log.close()
