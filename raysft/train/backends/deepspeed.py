"""The deepspeed backend: DeepSpeed's engine (ZeRO 0-3, offload, bf16/fp16) under raysft's loop (loop.py).

DeepSpeed runs `optim.adamw` and `optim.scheduler` (unless `train.deepspeed_config` names its own optimizer) with
the config generated from `train.*` (`optim.deepspeed_config`). `engine.step()` follows every micro-batch's
backward: DeepSpeed counts the accumulation steps and updates at the step's last one, clipping inside the engine
(`gradient_clipping`). The loss is `loss.global_mean_part`'s, backward not rescaled by the accumulation steps.
Sequence parallelism, tiled MLP and activation offload (`sequence_parallel.py`) are this backend's.

Checkpoints: `model/` is the engine's checkpoint (every rank its ZeRO partition, tag `global_step{N}`); a checkpoint
written by another worker count is read as DeepSpeed's universal checkpoint (`resize.py`: converted by the driver,
or here by rank 0 when an elastic run restarted on another size).
"""

from __future__ import annotations

from typing import Optional

from raysft import checkpoint as ckpt
from raysft.train import resize
from raysft.train.context import Worker
from raysft.train.metrics import setup_line
from raysft.train.optim import adamw, deepspeed_config, scheduler


def universal_form(w: Worker, good: Optional[str], state) -> Optional[resize.Universal]:
    """The universal form of checkpoint `good` when another number of workers wrote it, else None."""
    import torch.distributed as dist

    if state is None:
        return None
    if w.job.universal is not None and w.job.universal.checkpoint == good:
        return w.job.universal
    if state.world_size == w.world or state.zero_stage == 0:
        return None
    if w.rank == 0:
        resize.to_universal(good, state, w.cfg.output_dir, w.world, w.log)
    dist.barrier()
    return resize.location(good, state, w.cfg.output_dir)


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


class Backend:
    def __init__(self, w: Worker, device, good: Optional[str], state):
        import deepspeed

        from raysft.modeling import param_groups

        t, self.w = w.cfg.train, w
        self.sp = long_rows(w, device)
        self.universal = universal_form(w, good, state)
        config = deepspeed_config(t, w.cfg.cluster.use_gpu, w.shape)
        if self.universal:
            config["checkpoint"] = {"load_universal": True}
        own = "optimizer" in config  # the user's train.deepspeed_config names DeepSpeed's own optimizer
        total = w.schedule.total_steps
        optimizer = None if own else adamw(w.model, t)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=w.model, config=config, dist_init_required=False, optimizer=optimizer,
            model_parameters=param_groups(w.model, t.weight_decay) if own else None,
            lr_scheduler=lambda opt: scheduler(opt, t, total))
        if t.compile:
            self.engine.compile()  # torch.compile through DeepSpeed (its ZeRO hooks stay in place)
        self.module = self.engine.module
        w.log(setup_line(w.n_params, w.n_trainable, t.lora.r, len(w.rows), w.schedule, w.shape,
                         f"ZeRO-{t.zero_stage}", t.dtype, "deepspeed"))

    def restore(self, good: str, state) -> str:
        u = self.universal
        load_dir, tag = (u.load_dir, u.tag) if u else (ckpt.model_dir(good), None)
        self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                    load_module_strict=not self.w.cfg.train.lora.r)  # LoRA: the adapter only
        return f", written by {state.world_size} workers, loaded as a universal checkpoint" if u else ""

    def micro_batches(self, item):
        return self.sp.shard(item.micro_batches) if self.sp else item.micro_batches

    def forward_backward(self, batch: dict, n_trained: int):
        from raysft.loss import global_mean_part, loss_sum

        part, scaled = global_mean_part(loss_sum(self.engine, batch), n_trained, self.w.world)
        self.engine.backward(scaled, scale_wrt_gas=False)
        self.engine.step()  # an update at the accumulation boundary only (DeepSpeed counts the micro-batches)
        return part.detach()

    def optimizer_step(self, clip):
        return self.scheduler.get_last_lr()[0], self.engine.get_global_grad_norm() or 0.0

    def save(self, local: str, step: int) -> None:
        lora = bool(self.w.cfg.train.lora.r)  # the adapter only: the frozen base is the model folder's
        self.engine.save_checkpoint(ckpt.model_dir(local), tag=ckpt.deepspeed_tag(step),
                                    exclude_frozen_parameters=lora)

    def logits(self, batch: dict):
        return self.engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    def train(self, on: bool) -> None:
        self.engine.train(on)
