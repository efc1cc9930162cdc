"""What the driver hands each Train worker (`WorkerJob`), and what a worker knows once started (`Worker`),
built by one function, `start`, that the loop (loop.py) calls first for every backend.

The backends read the config through `Worker.cfg`; the shared helpers they call (metrics, evaluate, report,
checkpoint) take plain values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from raysft import capabilities
from raysft import checkpoint as ckpt
from raysft.config import Config
from raysft.data.prepared import PreparedRows
from raysft.train.hooks import WorkerHooks
from raysft.train.resize import Universal
from raysft.train.schedule import BatchShape, Schedule


@dataclass(frozen=True)
class WorkerJob:
    """Everything a Train worker is given by the driver (launch.fit), pickled into `train_loop_config`."""

    config: dict  # the resolved config, `to_dict` of it
    prepared: str  # the prepared dataset's folder (data/prepared.py)
    fingerprint: str  # of the prepared data, recorded in every checkpoint
    has_eval: bool = False
    vocab_grew: bool = False  # the tokenizer outgrew the model's embeddings (LoRA trains them too)
    universal: Optional[Universal] = None  # the driver converted the checkpoint for this worker count
    hooks: WorkerHooks = field(default_factory=WorkerHooks)


@dataclass
class Worker:
    """A started worker: its place in the group, its data, schedule and model."""

    job: WorkerJob
    cfg: Config
    rank: int
    world: int
    log: Callable[[str], None]  # rank 0's lines go to the console (console.WorkerConsole); the others' nowhere
    tokenizer: object
    rows: PreparedRows  # the train split
    eval_rows: Optional[PreparedRows]
    schedule: Schedule
    shape: BatchShape
    model: object
    n_params: int
    n_trainable: int
    run_dir: str  # the run's checkpoint folder in storage
    flat: bool = False  # micro-batches go to the model as one row (modeling.flat_batches: flash-attention)


def start(job: WorkerJob, trainer_checkpoints_activations: bool = False, backend_prefetches: bool = False) -> Worker:
    """Config, rank and world, rank-0 log, tokenizer, rows, schedule, and the model (seeded, LoRA applied).

    Sets DS_ACCELERATOR before anything imports DeepSpeed. `train.gradient_checkpointing` is turned on here,
    unless the Trainer turns it on itself (`trainer_checkpoints_activations`). Logs the attention kernel, the loss,
    compile and (for a backend that prefetches) prefetching.
    """
    import ray.train

    from raysft.config import from_dict

    cfg = from_dict(job.config)
    if not cfg.cluster.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    from raysft import loss
    from raysft.console import WorkerConsole
    from raysft.data.prepared import EVAL, saved_tokenizer
    from raysft.modeling import apply_lora, build_model, flat_batches, parameter_counts, resolve_attention

    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    log = WorkerConsole(cfg.output_dir, rank)  # rank 0's lines, for the driver to print (raysft.console)

    tokenizer = saved_tokenizer(job.prepared)
    rows = PreparedRows(job.prepared)
    torch.manual_seed(t.seed)
    attention, why = resolve_attention(cfg.model.attn_implementation, cfg.cluster.use_gpu and torch.cuda.is_available())
    if not cfg.cluster.use_gpu and capabilities.of(t.backend).deepspeed and not cpu_comm_built():
        log("deepspeed: compiling DeepSpeed's CPU communication extension (first run only, 30-150 s; cached in "
            "~/.cache/torch_extensions)")
    settings = f"attention: {attention} ({why}); loss: {t.fused_loss}; compile: {'on' if t.compile else 'off'}"
    log(settings + (f"; prefetch: {t.prefetch_batches} steps ahead" if backend_prefetches else ""))
    model = build_model(cfg.model.name_or_path, len(tokenizer), from_scratch=cfg.model.from_scratch, seed=t.seed,
                        dtype=t.dtype, attn_implementation=attention, trust_remote_code=cfg.model.trust_remote_code,
                        gradient_checkpointing=t.gradient_checkpointing and not trainer_checkpoints_activations)
    loss.attach(model, t.fused_loss)  # before LoRA wraps it (the head is looked up at each call)
    model = apply_lora(model, t.lora, vocab_grew=job.vocab_grew)
    n_params, n_trainable = parameter_counts(model)
    return Worker(job=job, cfg=cfg, rank=rank, world=world, log=log, tokenizer=tokenizer, rows=rows,
                  eval_rows=PreparedRows(job.prepared, EVAL) if job.has_eval else None,
                  schedule=Schedule(len(rows), t.global_batch_size, t.seed, t.epochs, t.max_steps),
                  shape=BatchShape(t.global_batch_size, t.micro_batch_size, world), model=model,
                  n_params=n_params, n_trainable=n_trainable,
                  run_dir=ckpt.run_dir(cfg.checkpoint.storage_path, cfg.run_name),
                  flat=flat_batches(attention, t.micro_batch_size))


def cpu_comm_built() -> bool:
    """Whether DeepSpeed's CPU communication extension is already compiled (torch's extension cache)."""
    import glob

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return any(glob.glob(os.path.join(root, *sub, "deepspeed_shm_comm", "*.so")) for sub in ((), ("*",)))


def device(use_gpu: bool):
    """This worker's torch device."""
    import torch

    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")
