"""What the driver hands each Train worker (`WorkerJob`), and what a worker knows once started (`Worker`),
built by one function, `start`, that both workers call first.

The worker files read the config through `Worker.cfg`; the shared helpers they call (metrics, evaluate, report,
checkpoint) take plain values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from raysft import checkpoint as ckpt
from raysft.checkpoint import RunState
from raysft.config import Config
from raysft.data.prepared import PreparedRows
from raysft.train.hooks import WorkerHooks
from raysft.train.metrics import StepLog, StepMetrics
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
    step_log: Optional[StepLog] = None  # made by `open_step_log`, once the restored state is known
    flat: bool = False  # micro-batches go to the model as one row (modeling.flat_batches: flash-attention)

    def open_step_log(self, start_step: int, state: Optional[RunState]) -> StepLog:
        """Rank 0's record of steps: metrics.jsonl, TensorBoard and the tracking runs of `train.report_to` (those
        of the restored checkpoint continued)."""
        from raysft.config import to_dict
        from raysft.train.tracking import Trackers

        t = self.cfg.train
        trackers = Trackers(self.cfg, self.rank, state.tracking if state else None, to_dict(self.cfg), self.log)
        self.step_log = StepLog(self.rank, self.cfg.output_dir, t.log_every_steps, start_step, self.log,
                                tensorboard="tensorboard" in t.report_to, trackers=trackers)
        return self.step_log

    def step_metrics(self, state: Optional[RunState]) -> StepMetrics:
        """The run's per-step metrics (metrics.StepMetrics), continuing the counts of the restored `state`."""
        from raysft.train.metrics import gpu_peak

        return StepMetrics(self.schedule, self.rows, self.world, self.n_params, self.model.config,
                           gpu_peak(self.cfg.cluster.use_gpu), state.step if state else 0,
                           state.samples_seen if state else 0, state.tokens_seen if state else 0,
                           state.samples_seen_by_source if state else None, self.rank)

    def run_state(self, step: int, steps, backend: str) -> RunState:
        """The state.json of a checkpoint at `step`; `steps`: the run's `metrics.StepMetrics` (what was seen)."""
        samples_seen, tokens_seen = steps.samples_seen, steps.tokens_seen
        t = self.cfg.train
        return RunState(step=step, epoch=self.schedule.epoch_of(max(step - 1, 0)), samples_seen=samples_seen,
                        tokens_seen=tokens_seen, seed=t.seed, fingerprint=self.job.fingerprint,
                        world_size=self.world, total_steps=self.schedule.total_steps,
                        global_batch_size=t.global_batch_size, final=step == self.schedule.total_steps,
                        backend=backend, zero_stage=t.zero_stage, lora=bool(t.lora.r),
                        tracking=self.step_log.trackers.ids() if self.step_log else {},
                        samples_seen_by_source=steps.seen_by_source())

    def commit_checkpoint(self, local: str, model, step: int, state: RunState, metrics: dict, gate) -> None:
        """The rest of a checkpoint of raysft's own loop, once the backend wrote its state into `local`'s model/:
        this rank's RNG, rank 0's copy of the model's config (`model`: the trained module, PEFT's base for LoRA) and
        the run files; then the report to Ray and the commit (report.ReportGate.report_checkpoint)."""
        ckpt.save_rng(local, self.rank)
        if self.rank == 0:
            from raysft.config import to_yaml
            from raysft.data.prepared import tokenizer_dir

            (model.get_base_model() if state.lora else model).config.save_pretrained(ckpt.model_dir(local))
            ckpt.write_run_files(local, state, to_yaml(self.cfg), tokenizer_dir(self.job.prepared))
        gate.report_checkpoint(local, step, metrics, self.rank, self.world, self.run_dir, self.cfg.checkpoint.keep,
                               self.log, self.job.hooks)

    def end_step(self, item, step_loss, processed: int, t0: float, lr: float, grad_norm, steps: StepMetrics,
                 step_log: StepLog, gate, model, generator, save: Callable[[int, dict], None], device) -> None:
        """After the optimizer step of `item` (a prefetch.StepBatch), on every rank, for the workers with raysft's
        own loop: the step's loss, tokens and data wait summed over ranks into its metrics, the eval when due
        (`model` computes the loss, `generator` answers the prompts), the step's line, then `save(step, metrics)`
        when a checkpoint is due or else the report to Ray (report.ReportGate), and the hooks' `after_step`."""
        import time

        import torch
        import torch.distributed as dist

        from raysft.train.evaluate import due, eval_due, run_evals

        step, total = item.step, self.schedule.total_steps
        stats = torch.tensor([step_loss.item(), processed, item.wait, gate.vote()], dtype=torch.float64,
                             device=device)
        dist.all_reduce(stats)
        metrics = steps(step, stats[0].item(), stats[1].item(), stats[2].item(), time.time() - t0, lr,
                        float(grad_norm))
        if eval_due(self, step, total):
            run_evals(model, generator, self, step, metrics, step_log, device)
        checkpoint_due = due(step, total, self.cfg.checkpoint.every_steps)
        step_log(metrics, checkpoint_due)
        if checkpoint_due:
            save(step, metrics)
        elif step_log.reportable(metrics):
            gate.report(metrics, stats[3].item())
        self.job.hooks.after_step(step, self.rank)


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
    if not cfg.cluster.use_gpu and t.backend != "fsdp" and not cpu_comm_built():  # the fsdp backend uses no DeepSpeed
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
