"""The one training loop, for every backend: start -> restore -> step loop -> end (`train_loop`, the Ray Train entry
point of every run).

A backend (`raysft/train/backends/<name>.py`, its capabilities in `raysft/capabilities.py`) implements `Backend`:
wrap the model and build its optimizer (`optim.adamw`) and schedule (`optim.scheduler`), restore its own state,
the forward and backward of one micro-batch (the loss normalised by `loss.global_mean_part`), the optimizer step
(returning the learning rate and the gradient norm; the loop decides where clipping happens: in the engine where
the backend's `engine_clips`, else the backend clips at the norm the loop passes), and save its own state into a
checkpoint's `model/`. Everything else is here, once: the step metrics summed over ranks, eval and the eval prompts
when due, the step line, the checkpoint's RNG, config and run files, the report to Ray and the commit (`Loop`).

A backend whose framework runs its own loop (`own_loop: false`: the hf backend, TRL's `SFTTrainer`) implements
`run(loop)` instead of the step methods and calls the same `Loop.end_step` and `Loop.commit` from its framework's
step and save callbacks.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

from raysft import capabilities
from raysft import checkpoint as ckpt
from raysft.checkpoint import RunState
from raysft.train import context
from raysft.train.context import Worker, WorkerJob
from raysft.train.metrics import StepLog, StepMetrics
from raysft.train.preemption import Preemption
from raysft.train.report import ReportGate


class Backend(Protocol):
    """What a backend module's `Backend` class implements (the step methods only where `own_loop`)."""

    module: object  # the trained module (PEFT's model under LoRA): its config is saved, the eval prompts use it
    engine: object  # what computes the eval loss (the DeepSpeed engine, the sharded model)

    def __init__(self, w: Worker, device, good: Optional[str], state: Optional[RunState]) -> None:
        """Wrap `w.model`, build the optimizer and the schedule, and log the setup line; `good`/`state`: the
        checkpoint the run resumes from, if any (a backend may need to know before it wraps the model)."""

    def restore(self, good: str, state: RunState) -> str:
        """Load the backend's state from checkpoint `good`; the resume line's detail ('' or ', written by ...')."""

    def micro_batches(self, item) -> Iterable[dict]:
        """The micro-batches this rank runs for step `item` (a prefetch.StepBatch)."""

    def forward_backward(self, batch: dict, n_trained: int):
        """Forward and backward of one micro-batch; its part of the global batch's mean loss, detached."""

    def optimizer_step(self, clip: Optional[float]) -> tuple[float, float]:
        """The step's update (gradients clipped at `clip` unless None); (learning rate, gradient norm)."""

    def save(self, local: str, step: int) -> None:
        """Write the backend's state (model, optimizer, schedule) into `ckpt.model_dir(local)`, on every rank."""

    def logits(self, batch: dict):
        """The model's logits for `batch` (the finished hook's checks)."""

    def train(self, on: bool) -> None:
        """Training mode on or off."""

    def run(self, loop: "Loop") -> None:
        """Only where not `own_loop`: run the framework's loop, calling `loop.end_step` and `loop.commit`."""


@dataclass
class Loop:
    """A run's loop state on one worker: what was trained (`steps`), the step log, the report gate, the
    preemption notices (preemption.py)."""

    w: Worker
    device: object
    state: Optional[RunState]  # the restored checkpoint's
    steps: StepMetrics = field(init=False)
    step_log: StepLog = field(init=False)
    gate: ReportGate = field(init=False)
    preemption: Preemption = field(init=False)
    due_at: float = 0.0  # when the checkpoint in progress fell due
    for_notice: bool = False  # whether it is a preemption notice's

    def __post_init__(self):
        from raysft.config import to_dict
        from raysft.train.metrics import gpu_peak
        from raysft.train.tracking import Trackers

        w, state, t = self.w, self.state, self.w.cfg.train
        self.steps = StepMetrics(w.schedule, w.rows, w.world, w.n_params, w.model.config,
                                 gpu_peak(w.cfg.cluster.use_gpu), self.start_step,
                                 state.samples_seen if state else 0, state.tokens_seen if state else 0,
                                 state.samples_seen_by_source if state else None, w.rank)
        trackers = Trackers(w.cfg, w.rank, state.tracking if state else None, to_dict(w.cfg), w.log)
        self.step_log = StepLog(w.rank, w.cfg.output_dir, t.log_every_steps, self.start_step, w.log,
                                tensorboard="tensorboard" in t.report_to, trackers=trackers)
        self.gate = ReportGate(w.rank)
        self.preemption = Preemption(w.rank, w.log)

    @property
    def start_step(self) -> int:
        return self.state.step if self.state else 0

    def run_state(self, step: int) -> RunState:
        """The state.json of a checkpoint at `step`."""
        w, t = self.w, self.w.cfg.train
        return RunState(step=step, epoch=w.schedule.epoch_of(max(step - 1, 0)), samples_seen=self.steps.samples_seen,
                        tokens_seen=self.steps.tokens_seen, seed=t.seed, fingerprint=w.job.fingerprint,
                        world_size=w.world, total_steps=w.schedule.total_steps,
                        global_batch_size=t.global_batch_size, final=step == w.schedule.total_steps,
                        backend=t.backend, zero_stage=t.zero_stage, lora=bool(t.lora.r),
                        tracking=self.step_log.trackers.ids(), samples_seen_by_source=self.steps.seen_by_source())

    def end_step(self, step: int, loss: float, processed: int, wait: float, t0: float, lr: float, grad_norm,
                 engine, generator) -> Optional[dict]:
        """After the optimizer step of `step`, on every rank: the step's loss, tokens and data wait summed over ranks
        into its metrics, the eval when due (`engine` computes the loss, `generator` answers the prompts), the
        step's line. A checkpoint is due at `checkpoint.every_steps`, at the end, and at a preemption notice
        (preemption.py: asked at rank 0's cadence, voted on in the same all-reduce). Returns the metrics when a
        checkpoint is due (the caller saves, then calls `commit`); else reports to Ray when due
        (report.ReportGate), calls the hooks' `after_step` and returns None."""
        import torch
        import torch.distributed as dist

        from raysft.train.evaluate import due, eval_due, run_evals

        w, total = self.w, self.w.schedule.total_steps
        stats = torch.tensor([loss, processed, wait, self.gate.vote(), *self.preemption.votes()],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        step_s = time.time() - t0
        metrics = self.steps(step, stats[0].item(), stats[1].item(), stats[2].item(), step_s, lr, float(grad_norm))
        periodic = due(step, total, w.cfg.checkpoint.every_steps)
        self.for_notice = self.preemption.check(step, stats[4].item(), stats[5].item(), step_s, periodic)
        if eval_due(w, step, total):
            run_evals(engine, generator, w, step, metrics, self.step_log, self.device)
        checkpoint_due = periodic or self.for_notice
        self.step_log(metrics, checkpoint_due)
        if checkpoint_due:
            self.due_at = time.time()
            return metrics
        if self.step_log.reportable(metrics):
            self.gate.report(metrics, stats[3].item())
        w.job.hooks.after_step(step, w.rank)
        return None

    def commit(self, local: str, step: int, metrics: dict, module=None) -> None:
        """The rest of a checkpoint once the backend wrote its state into `local`'s model/: with `module` (raysft's
        own loop) this rank's RNG and rank 0's copy of the model's config (PEFT's base config under LoRA); rank 0's
        run files; then the report to Ray and the commit (report.ReportGate.report_checkpoint), and the hooks'
        `after_step`."""
        from raysft.config import to_yaml
        from raysft.data.prepared import tokenizer_dir

        w = self.w
        if module is not None:
            ckpt.save_rng(local, w.rank)
        if w.rank == 0:
            state = self.run_state(step)
            if module is not None:
                (module.get_base_model() if state.lora else module).config.save_pretrained(ckpt.model_dir(local))
            ckpt.write_run_files(local, state, to_yaml(w.cfg), tokenizer_dir(w.job.prepared))
        self.gate.report_checkpoint(local, step, metrics, w.rank, w.world, w.run_dir, w.cfg.checkpoint.keep, w.log,
                                    w.job.hooks)
        self.preemption.saved(step, time.time() - self.due_at, self.for_notice)
        w.job.hooks.after_step(step, w.rank)


def steps(loop: Loop, backend: Backend, clip: Optional[float]) -> None:
    """raysft's own step loop: step start_step + 1, ... in the schedule's order, each a checkpoint when due."""
    import torch

    from raysft.train.prefetch import Prefetcher

    w, t = loop.w, loop.w.cfg.train
    backend.train(True)
    batches = Prefetcher(w.rows, w.schedule, w.rank, w.shape, loop.start_step, w.tokenizer.pad_token_id,
                         loop.device, t.prefetch_batches, multiple=t.sequence_parallel_size, flat=w.flat)
    t0 = time.time()
    for item in batches:
        step_loss, processed = torch.zeros((), device=loop.device), 0
        for batch in backend.micro_batches(item):
            step_loss += backend.forward_backward(batch, item.n_trained)
            processed += batch["input_ids"].numel()
        lr, grad_norm = backend.optimizer_step(clip)
        metrics = loop.end_step(item.step, step_loss.item(), processed, item.wait, t0, lr, grad_norm,
                                backend.engine, backend.module)
        if metrics is not None:
            local = tempfile.mkdtemp(prefix="raysft-ckpt-")
            backend.save(local, item.step)
            loop.commit(local, item.step, metrics, backend.module)
        t0 = time.time()


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point of every backend. `loop_config["job"]`: the `WorkerJob` from launch.fit."""
    # ------------------------------------------------------------------ start
    job: WorkerJob = loop_config["job"]
    caps = capabilities.of(job.config["train"]["backend"])
    w = context.start(job, trainer_checkpoints_activations=not caps.own_loop, backend_prefetches=caps.own_loop)
    device = context.device(w.cfg.cluster.use_gpu)
    good = ckpt.latest_good(w.run_dir, warn=w.log)
    state = ckpt.read_state(good) if good else None
    backend: Backend = importlib.import_module(caps.module).Backend(w, device, good, state)

    # ------------------------------------------------------------------ restore
    if state is not None:
        detail = backend.restore(good, state)
        if caps.own_loop:  # a framework with its own loop restores its RNG itself
            ckpt.restore_rng(good, w.rank)
        w.log(f"resume: from {good} at step {state.step} (epoch {state.epoch}, {state.samples_seen} rows seen"
              f"{detail})")

    # ------------------------------------------------------------------ loop
    loop = Loop(w, device, state)
    if caps.own_loop:
        steps(loop, backend, None if caps.engine_clips else w.cfg.train.max_grad_norm)
    else:
        backend.run(loop)

    # ------------------------------------------------------------------ end
    backend.train(False)
    job.hooks.finished(backend.logits, w.rows, w.rank, device)
    if loop.preemption.summary() and loop.preemption.info is not None:
        w.log(loop.preemption.summary())
    loop.step_log.close()
