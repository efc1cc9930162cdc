"""The fsdp worker: PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`, DTensor parameters) and its
distributed checkpoint (DCP), on the deepspeed worker's contracts. Start, restore, loop, end, like that worker.

Sharding: `fully_shard` on each decoder layer (the model's `_no_split_modules`), then on the root (embeddings, final
norm, output head). `train.zero_stage` picks when a layer's gathered parameters are freed: 3 reshards them after the
forward and gathers them again for the backward (ZeRO-3-like: least memory), 2 keeps them from forward to backward
(ZeRO-2-like: one all-gather less per layer and step, a layer's full parameters held meanwhile). Gradients and
optimizer state are sharded either way. `train.dtype: bf16` is `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` over fp32 sharded parameters (what the optimizer updates); fp32 trains in fp32. Offload
(`train.offload_*`) is FSDP2's `CPUOffloadPolicy` (parameters, gradients and optimizer state on the CPU, the
optimizer step there); it needs a GPU (torch: "Cannot access accelerator device when none is available" on CPU).
`train.gradient_checkpointing` checkpoints each layer (transformers' non-reentrant checkpointing, set before
sharding); `train.compile` compiles each layer before it is sharded, as torchtitan does.

Loss: the deepspeed worker's (see there): each micro-batch's summed loss over the global batch's trained tokens,
times the world size, because FSDP2's reduce-scatter averages gradients over ranks. The chunked loss reads the
output head inside the root's forward, where FSDP2 has gathered the root's parameters: no full-vocabulary logits.
Optimizer: torch's AdamW on `modeling.param_groups` of the sharded parameters, `clip_grad_norm_` on the DTensor
gradients, the scheduler of the other backends.

Checkpoints (raysft/checkpoint.py's contract): `model/` is a DCP checkpoint (`get_state_dict` of model and
optimizer, and the scheduler's state) that every rank writes its shard of (`__{rank}_0.distcp`, rank 0 the
`.metadata`), plus the model's config.json; `rng/rank{r}.pt`. DCP reshards on load, so a run resumes on another
worker count directly. With LoRA the frozen base is left out (`ignore_frozen_params`): checkpoints hold what trains.
"""

from __future__ import annotations

import tempfile
import time

from raysft import checkpoint as ckpt
from raysft.train import context
from raysft.train.context import Worker, WorkerJob
from raysft.train.metrics import setup_line
from raysft.train.optim import lr_scheduler_name
from raysft.train.report import ReportGate

BACKEND = "fsdp"


def sharding_name(zero_stage: int) -> str:
    """How the setup line names the fsdp backend's sharding.

    >>> sharding_name(3)
    'FSDP2, resharded after forward (ZeRO-3-like)'
    """
    return "FSDP2, " + ("resharded after forward (ZeRO-3-like)" if zero_stage == 3 else
                        "kept gathered from forward to backward (ZeRO-2-like)")


def decoder_layers(model) -> list:
    """The model's decoder layers: the modules of the classes transformers never splits (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"fsdp: {type(base).__name__} names no decoder layer class (_no_split_modules); "
                           "use train.backend=deepspeed for this model")
    return layers


def shard(model, t, use_gpu: bool, world: int):
    """`fully_shard` each decoder layer, then the root (see the module's doc); the model, in place."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if t.dtype == "bf16":
        model.float()  # fp32 sharded parameters; the policy casts each gathered layer to bf16 for compute
    mesh = init_device_mesh("cuda" if use_gpu else "cpu", (world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if t.dtype == "bf16"
              else MixedPrecisionPolicy())
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": t.zero_stage == 3}
    if t.offload_optimizer or t.offload_params:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=use_gpu)
    for layer in decoder_layers(model):
        if t.compile:
            layer.compile()
        fully_shard(layer, **options)
    fully_shard(model, **options)
    if use_gpu and not (t.offload_optimizer or t.offload_params):
        model.to(context.device(use_gpu))
    return model


def state_options(lora: bool):
    """DCP state-dict options: a LoRA run's checkpoint holds the adapter (and any trained embeddings) only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def save_checkpoint(model, optimizer, scheduler, w: Worker, step: int, state: ckpt.RunState, metrics: dict,
                    gate: ReportGate) -> None:
    """Every rank's shard of the DCP checkpoint and its RNG, rank 0's run files; then report and commit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    local = tempfile.mkdtemp(prefix="raysft-ckpt-")
    model_state, optim_state = get_state_dict(model, optimizer, options=state_options(state.lora))
    # each rank writes into its own folder; the shards' names are distinct and .metadata (rank 0's) names them
    # relative to the folder, so Ray Train's merge of the ranks' folders in storage is the whole checkpoint
    dcp.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()},
             checkpoint_id=ckpt.model_dir(local))
    w.commit_checkpoint(local, model, step, state, metrics, gate)


def restore(model, optimizer, scheduler, good: str, lora: bool) -> None:
    """Model, optimizer and scheduler from the DCP checkpoint at `good`, resharded to this worker group by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = state_options(lora)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}
    dcp.load(state, checkpoint_id=ckpt.model_dir(good))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    scheduler.load_state_dict(state["scheduler"])


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point. `loop_config["job"]`: the `WorkerJob` from launch.fit."""
    # ------------------------------------------------------------------ start
    job: WorkerJob = loop_config["job"]
    w = context.start(job, backend_prefetches=True)
    cfg, t, rank, world, rows, schedule = w.cfg, w.cfg.train, w.rank, w.world, w.rows, w.schedule
    import torch
    from transformers import get_scheduler

    from raysft.loss import loss_sum
    from raysft.modeling import param_groups
    from raysft.train.prefetch import Prefetcher

    device = context.device(cfg.cluster.use_gpu)
    model = shard(w.model, t, cfg.cluster.use_gpu, world)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr)
    scheduler = get_scheduler(lr_scheduler_name(t.lr_scheduler), optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=schedule.total_steps)
    trained = [p for p in model.parameters() if p.requires_grad]
    w.log(setup_line(w.n_params, w.n_trainable, t.lora.r, len(rows), schedule, w.shape, sharding_name(t.zero_stage),
                     t.dtype, BACKEND))

    def logits(batch):
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    # ------------------------------------------------------------------ restore
    start_step = 0
    good = ckpt.latest_good(w.run_dir, warn=w.log)
    state = ckpt.read_state(good) if good else None
    if state is not None:
        restore(model, optimizer, scheduler, good, bool(t.lora.r))
        ckpt.restore_rng(good, rank)
        start_step = state.step
        w.log(f"resume: from {good} at step {start_step} (epoch {state.epoch}, {state.samples_seen} rows seen"
              + (f", written by {state.world_size} worker{'s' if state.world_size > 1 else ''}, resharded by DCP)"
                 if state.world_size != world else ")"))

    # ------------------------------------------------------------------ loop
    steps = w.step_metrics(state)
    step_log = w.open_step_log(start_step, state)
    gate = ReportGate(rank)

    def save(step: int, metrics: dict) -> None:
        save_checkpoint(model, optimizer, scheduler, w, step, w.run_state(step, steps, BACKEND), metrics, gate)

    model.train()
    batches = Prefetcher(rows, schedule, rank, w.shape, start_step, w.tokenizer.pad_token_id, device,
                         t.prefetch_batches, flat=w.flat)
    t0 = time.time()
    for item in batches:  # step start_step + 1, ... in the schedule's order
        step_loss, processed = torch.zeros((), device=device), 0
        for batch in item.micro_batches:
            loss = loss_sum(model, batch) / item.n_trained  # the global batch's mean, this micro-batch's part
            (loss * world).backward()  # the reduce-scatter averages over ranks
            step_loss += loss.detach()
            processed += batch["input_ids"].numel()
        norm = torch.nn.utils.clip_grad_norm_(trained, t.max_grad_norm or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        w.end_step(item, step_loss, processed, t0, scheduler.get_last_lr()[0], norm.item(), steps, step_log, gate,
                   model, model, save, device)
        t0 = time.time()

    # ------------------------------------------------------------------ end
    model.eval()
    job.hooks.finished(logits, rows, rank, device)
    step_log.close()
