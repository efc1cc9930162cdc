"""The hf backend: TRL's `SFTTrainer` inside each Ray Train worker, its own loop behind loop.py's seam, on the same
prepared rows, in the same order, with the same loss, optimizer, schedule and DeepSpeed config as the deepspeed
backend, so the two train the same model (tested to 1e-4 per step).

What raysft hands the Trainer (hf_trainer.py):
- the data: one rank's micro-batches of the deterministic schedule, for every step of the run, as a plain
  `DataLoader` over the memory-mapped prepared rows (never re-tokenized; `skip_prepare_dataset`). On resume
  the Trainer skips the steps already trained at the sampler (`accelerate.skip_first_batches`, no row is read),
  so it continues on the exact next sample.
- the loss (`loss.global_mean_part` on TRL's `num_items_in_batch`), the optimizer and schedule (`optim.adamw`,
  `optim.scheduler`) of every backend, and the generated DeepSpeed config (hf_args.sft_config); clipping is the
  engine's.
- what it shares with the other backends, through `loop.Loop`: after each optimizer step the Trainer's callback
  calls `Loop.end_step` (metrics, eval, the eval prompts, the step line); at a due step the Trainer saves, and its
  checkpoint folder (DeepSpeed state, RNG per rank, scheduler, trainer_state.json) becomes `model/` of raysft's
  checkpoint, committed by `Loop.commit` as any other.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Optional

from raysft import checkpoint as ckpt
from raysft.train.context import Worker
from raysft.train.hf_args import sft_config
from raysft.train.metrics import setup_line
from raysft.train.optim import deepspeed_config


class Backend:
    def __init__(self, w: Worker, device, good: Optional[str], state):
        from torch.utils.data import DataLoader
        from transformers.trainer_callback import PrinterCallback

        from raysft.train.hf_trainer import ScheduledSFTTrainer, TimedCollate

        t, schedule, self.w, self.good = w.cfg.train, w.schedule, w, good
        micro_batches = [micro for step in range(schedule.total_steps)
                         for micro in schedule.rank_micro_batches(step, w.rank, w.shape)]
        self.collate = TimedCollate(w.tokenizer.pad_token_id, flat=w.flat)
        loader = DataLoader(w.rows.ds, batch_sampler=micro_batches, collate_fn=self.collate, num_workers=0,
                            pin_memory=w.cfg.cluster.use_gpu)  # the Trainer copies each batch to the GPU
        self.trainer_dir = tempfile.mkdtemp(prefix=f"raysft-hf-rank{w.rank}-")  # checkpoints move out at once
        args = sft_config(t, w.cfg.cluster.use_gpu, self.trainer_dir,
                          deepspeed_config(t, w.cfg.cluster.use_gpu, w.shape), w.shape, schedule.total_steps)
        self.trainer = ScheduledSFTTrainer(model=w.model, args=args, train_dataset=w.rows.ds,
                                           processing_class=w.tokenizer, loader=loader, train=t, world=w.world)
        self.trainer.remove_callback(PrinterCallback)  # raysft prints its own step lines
        self.module = w.model
        w.log(setup_line(w.n_params, w.n_trainable, t.lora.r, len(w.rows), schedule, w.shape,
                         f"ZeRO-{t.zero_stage}", t.dtype, "hf (TRL SFTTrainer)"))

    @property
    def engine(self):
        return self.trainer.model_wrapped

    def restore(self, good: str, state) -> str:
        return ""  # the Trainer loads model/ (and its RNG) when `run` starts it

    def run(self, loop) -> None:
        """The Trainer's loop, calling `loop.end_step` after each optimizer step and `loop.commit` after a save."""
        from raysft.train.hf_trainer import StepCallback

        trainer, due_metrics = self.trainer, {}

        def step_end(step: int, step_time: float) -> bool:
            import time

            loss, processed = trainer.take_step_sums()
            metrics = loop.end_step(step, loss, processed, self.collate.take(), time.time() - step_time,
                                    trainer.lr_scheduler.get_last_lr()[0],
                                    float(self.engine.get_global_grad_norm() or 0.0), self.engine, trainer.model)
            due_metrics.clear()  # the checkpoint report carries this step's metrics only
            due_metrics.update(metrics or {})
            return metrics is not None

        def saved(step: int, folder: str) -> None:
            local = tempfile.mkdtemp(prefix="raysft-ckpt-")
            shutil.move(folder, ckpt.model_dir(local))
            loop.commit(local, step, dict(due_metrics))

        trainer.add_callback(StepCallback(step_end, saved))
        trainer.train(resume_from_checkpoint=ckpt.model_dir(self.good) if self.good else None)
        shutil.rmtree(self.trainer_dir, ignore_errors=True)

    def logits(self, batch: dict):
        return self.trainer.logits(batch)

    def train(self, on: bool) -> None:
        self.trainer.model_wrapped.train(on)
