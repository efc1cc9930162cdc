"""The hf worker: TRL's `SFTTrainer` inside each Ray Train worker, on the same prepared rows, in the same order,
with the same loss, optimizer and DeepSpeed config as the deepspeed worker, so the two backends train the same
model (tested to 1e-4 per step). Start, restore, loop (the Trainer's, with raysft's step function), end.

What raysft hands the Trainer (hf_trainer.py):
- the data: one rank's micro-batches of the deterministic schedule, for every step of the run, as a plain
  `DataLoader` over the memory-mapped prepared rows (never re-tokenized; `skip_prepare_dataset`). On resume
  the Trainer skips the steps already trained at the sampler (`accelerate.skip_first_batches`, no row is read),
  so it continues on the exact next sample.
- the loss: TRL's `num_items_in_batch` path is the deepspeed worker's loss: the sum over a micro-batch divided
  by the trained tokens of the global batch, times the world size (DeepSpeed averages gradients over ranks).
- the optimizer: torch AdamW on `raysft.modeling.param_groups` (the Trainer's own groups); the scheduler from
  `train.lr_scheduler`; the generated DeepSpeed config minus its optimizer block (hf_args.sft_config).
- checkpoints: at each due step the step function asks the Trainer to save; the Trainer's own checkpoint folder
  (DeepSpeed state, RNG per rank, scheduler, trainer_state.json) becomes `model/` of raysft's checkpoint, which is
  reported to Ray and committed exactly as the deepspeed worker's.
"""

from __future__ import annotations

import shutil
import tempfile

from raysft import checkpoint as ckpt
from raysft.train import context
from raysft.train.context import WorkerJob
from raysft.train.evaluate import due, eval_due, run_evals
from raysft.train.hf_args import sft_config
from raysft.train.metrics import setup_line
from raysft.train.optim import deepspeed_config
from raysft.train.report import ReportGate

BACKEND = "hf"


def train_loop(loop_config: dict) -> None:
    """Ray Train entry point. `loop_config["job"]`: the `WorkerJob` from launch.fit."""
    # ------------------------------------------------------------------ start
    job: WorkerJob = loop_config["job"]
    w = context.start(job, trainer_checkpoints_activations=True)  # SFTConfig's gradient_checkpointing does it
    cfg, t, rank, world, rows, schedule = w.cfg, w.cfg.train, w.rank, w.world, w.rows, w.schedule
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from transformers.trainer_callback import PrinterCallback

    from raysft.config import to_yaml
    from raysft.data.prepared import tokenizer_dir
    from raysft.train.hf_trainer import ScheduledSFTTrainer, StepCallback, TimedCollate

    ds_config = deepspeed_config(t, cfg.cluster.use_gpu, w.shape)
    del ds_config["optimizer"]  # the Trainer's torch AdamW on the same groups (ScheduledSFTTrainer)
    micro_batches = [micro for step in range(schedule.total_steps)
                     for micro in schedule.rank_micro_batches(step, rank, w.shape)]
    collate_rows = TimedCollate(w.tokenizer.pad_token_id, flat=w.flat)
    loader = DataLoader(rows.ds, batch_sampler=micro_batches, collate_fn=collate_rows, num_workers=0,
                        pin_memory=cfg.cluster.use_gpu)  # the Trainer copies each batch to the GPU
    trainer_dir = tempfile.mkdtemp(prefix=f"raysft-hf-rank{rank}-")  # per rank: checkpoints move out at once
    trainer = ScheduledSFTTrainer(
        model=w.model, args=sft_config(t, cfg.cluster.use_gpu, trainer_dir, ds_config, w.shape, schedule.total_steps),
        train_dataset=rows.ds, processing_class=w.tokenizer, loader=loader, lr=t.lr, weight_decay=t.weight_decay,
        world=world)
    trainer.remove_callback(PrinterCallback)  # raysft prints its own step lines
    w.log(setup_line(w.n_params, w.n_trainable, t.lora.r, len(rows), schedule, w.shape, f"ZeRO-{t.zero_stage}", t.dtype,
                     "hf (TRL SFTTrainer)"))

    # ------------------------------------------------------------------ restore (the Trainer loads model/)
    good = ckpt.latest_good(w.run_dir, warn=w.log)
    start_step, state = 0, None
    if good is not None:
        state = ckpt.read_state(good)
        start_step = state.step
        w.log(f"resume: from {good} at step {start_step} (epoch {state.epoch}, {state.samples_seen} rows seen)")

    # ------------------------------------------------------------------ loop: the Trainer's, calling these
    steps = w.step_metrics(state)
    step_log = w.open_step_log(start_step, state)
    gate = ReportGate(rank)
    last_metrics: dict = {}

    def step_end(step: int, step_time: float) -> bool:
        """After each optimizer step: metrics, eval and log when due; whether a checkpoint is due (the Trainer
        then saves and calls `saved`)."""
        loss, processed = trainer.take_step_sums()
        device = trainer.args.device
        stats = torch.tensor([loss, processed, collate_rows.take(), gate.vote()], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        engine = trainer.model_wrapped
        metrics = steps(step, stats[0].item(), stats[1].item(), stats[2].item(), step_time,
                        trainer.lr_scheduler.get_last_lr()[0], float(engine.get_global_grad_norm() or 0.0))
        if eval_due(w, step, schedule.total_steps):
            run_evals(engine, trainer.model, w, step, metrics, step_log, device)
        checkpoint_due = due(step, schedule.total_steps, cfg.checkpoint.every_steps)
        step_log(metrics, checkpoint_due)
        last_metrics.clear()  # the checkpoint report carries this step's metrics only
        last_metrics.update(metrics)
        if checkpoint_due:
            return True
        if step_log.reportable(metrics):
            gate.report(metrics, stats[3].item())
        job.hooks.after_step(step, rank)
        return False

    def saved(step: int, folder: str) -> None:
        """The Trainer's checkpoint folder becomes model/ of raysft's checkpoint; report and commit it."""
        local = tempfile.mkdtemp(prefix="raysft-ckpt-")
        shutil.move(folder, ckpt.model_dir(local))
        if rank == 0:
            state = w.run_state(step, steps, BACKEND)
            ckpt.write_run_files(local, state, to_yaml(cfg), tokenizer_dir(job.prepared))
        gate.report_checkpoint(local, step, dict(last_metrics), rank, world, w.run_dir, cfg.checkpoint.keep, w.log,
                               job.hooks)
        job.hooks.after_step(step, rank)

    trainer.add_callback(StepCallback(step_end, saved))
    trainer.train(resume_from_checkpoint=ckpt.model_dir(good) if good else None)

    # ------------------------------------------------------------------ end
    trainer.model_wrapped.eval()
    job.hooks.finished(trainer.logits, rows, rank, trainer.args.device)
    step_log.close()
    shutil.rmtree(trainer_dir, ignore_errors=True)
