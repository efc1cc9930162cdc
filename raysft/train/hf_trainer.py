"""What raysft hands TRL: an SFTTrainer on raysft's schedule, optimizer, learning-rate schedule and loss, a timed
collate, and the callback that calls the hf backend's step and save functions (backends/hf.py) at the Trainer's
step boundaries.

Imports trl and transformers at the top: import it only inside a Train worker, after `context.start` (which
sets DS_ACCELERATOR before DeepSpeed is imported).
"""

from __future__ import annotations

import os
import time
from typing import Callable

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from raysft.loss import global_mean_part, loss_sum
from raysft.modeling import collate
from raysft.train.optim import adamw, scheduler

ROW_COLUMNS = ("input_ids", "labels", "position_ids")


class TimedCollate:
    """The DataLoader's collate_fn: prepared rows -> padded tensors, timing itself (the step's data wait)."""

    def __init__(self, pad_id: int, flat: bool = False):
        self.pad_id, self.flat, self.seconds = pad_id, flat, 0.0

    def __call__(self, items: list[dict]) -> dict:
        t0 = time.time()
        batch = collate({k: [it[k] for it in items] for k in ROW_COLUMNS}, self.pad_id, flat=self.flat)
        self.seconds += time.time() - t0
        return batch

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class ScheduledSFTTrainer(SFTTrainer):
    """SFTTrainer reading this rank's micro-batches from `loader` (not re-sharded by accelerate: the schedule
    already gave this rank its rows), with every backend's optimizer and schedule (`optim.adamw`, `optim.scheduler`
    of `train`), summing each step's loss and processed tokens for raysft's metrics."""

    def __init__(self, *args, loader, train, world: int, **kwargs):
        self.loader, self.train_settings, self.world = loader, train, world
        self.step_loss, self.processed = 0.0, 0
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self):
        return self.loader

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = adamw(self.model, self.train_settings)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = scheduler(optimizer or self.optimizer, self.train_settings, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.processed += inputs["input_ids"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_loss += loss.item() / self.world  # TRL multiplied the global-token mean by the world size
        return loss

    def take_step_sums(self) -> tuple[float, int]:
        """(loss, processed tokens) of this rank since the last call."""
        sums = (self.step_loss, self.processed)
        self.step_loss, self.processed = 0.0, 0
        return sums

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """raysft's loss (`train.fused_loss`, raysft.loss) in place of TRL's fused head, normalised as every
        backend's (`loss.global_mean_part`; TRL's `num_items_in_batch` is the global batch's trained tokens under
        `average_tokens_across_devices`)."""
        _, scaled = global_mean_part(loss_sum(model, inputs), num_items_in_batch, self.accelerator.num_processes)
        return scaled

    def logits(self, batch: dict):
        return self.model_wrapped(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  use_cache=False).logits


class StepCallback(TrainerCallback):
    """`step_end(step, seconds) -> save?` after every optimizer step; `saved(step, folder)` after the Trainer saved
    the checkpoint folder that `step_end` asked for."""

    def __init__(self, step_end: Callable[[int, float], bool], saved: Callable[[int, str], None]):
        self.step_end, self.saved, self.t0 = step_end, saved, time.time()

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_end(state.global_step, time.time() - self.t0):
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saved(state.global_step, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control
