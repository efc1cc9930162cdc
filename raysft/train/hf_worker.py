"""The hf worker: TRL's `SFTTrainer` inside each Ray Train worker, on the same prepared rows, in the same order,
with the same loss, optimizer and DeepSpeed config as the deepspeed worker, so the two backends train the same
model (tested to 1e-4 per step).

What raysft hands the Trainer:
- the data: one rank's micro-batches of the deterministic schedule, for every step of the run, as a plain
  `DataLoader` over the memory-mapped prepared rows (never re-tokenized; `skip_prepare_dataset`). On resume
  the Trainer skips the steps already trained at the sampler (`accelerate.skip_first_batches`, no row is read),
  so it continues on the exact next sample.
- the loss: TRL's `num_items_in_batch` path is the deepspeed worker's loss: the sum over a micro-batch divided
  by the trained tokens of the global batch, times the world size (DeepSpeed averages gradients over ranks).
- the optimizer: torch AdamW on `raysft.modeling.param_groups` (the Trainer's own groups); the scheduler from
  `train.lr_scheduler`; the generated DeepSpeed config minus its optimizer block.
- checkpoints: at each due step a callback asks the Trainer to save; the Trainer's own checkpoint folder
  (DeepSpeed state, RNG per rank, scheduler, trainer_state.json) becomes `model/` of raysft's checkpoint, which is
  reported to Ray and committed exactly as the deepspeed worker's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

# SFTConfig fields raysft sets from its own config: giving them in train.hf_args is an error naming the raysft key
OWNED = {
    "output_dir": "output_dir", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size", "max_steps": "train.max_steps",
    "num_train_epochs": "train.epochs", "learning_rate": "train.lr", "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "bf16": "train.dtype", "fp16": "train.dtype", "seed": "train.seed", "data_seed": "train.seed",
    "deepspeed": "train.deepspeed_config", "gradient_checkpointing": "train.gradient_checkpointing",
    "save_strategy": "checkpoint.every_steps", "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep", "eval_strategy": "train.eval_every_steps",
    "eval_steps": "train.eval_every_steps", "logging_steps": "train.log_every_steps", "use_cpu": "cluster.use_gpu",
    "packing": "data.packing", "max_length": "data.max_seq_len", "completion_only_loss": "data.loss_on",
    "assistant_only_loss": "data.loss_on", "dataset_kwargs": "data", "peft_config": "train.lora",
    "resume_from_checkpoint": "checkpoint", "average_tokens_across_devices": "(always on)",
}


def check_hf_args(hf_args: dict) -> None:
    """Every key of train.hf_args is an SFTConfig field raysft does not set itself (run on the driver)."""
    import dataclasses
    import difflib

    from trl import SFTConfig

    from raysft.config import ConfigError
    from raysft.errors import format_error

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    problems = []
    for key, value in hf_args.items():
        if key in OWNED:
            problems.append(format_error(f"train.hf_args.{key}", f"is set by raysft from {OWNED[key]}", value,
                                         f"set {OWNED[key]} instead"))
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields - set(OWNED)), n=1)
            problems.append(format_error(f"train.hf_args.{key}", "is not a trl.SFTConfig field", value,
                                         f"did you mean {close[0]}?" if close else
                                         "see https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig"))
    if problems:
        raise ConfigError(problems)


def sft_config(cfg, output_dir: str, ds_config: dict, accumulation: int, total_steps: int):
    """The SFTConfig of a run: raysft's settings, then train.hf_args (checked by `check_hf_args`)."""
    from trl import SFTConfig

    from raysft.train.common import lr_scheduler_name

    t = cfg.train
    return SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accumulation, max_steps=total_steps,
        learning_rate=t.lr, lr_scheduler_type=lr_scheduler_name(t.lr_scheduler),
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim="adamw_torch", bf16=t.dtype == "bf16", fp16=t.dtype == "fp16", seed=t.seed, data_seed=t.seed,
        deepspeed=ds_config, gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=t.log_every_steps,
        report_to="none", disable_tqdm=True, use_cpu=not cfg.cluster.use_gpu, dataloader_num_workers=0,
        packing=False, max_length=None, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        average_tokens_across_devices=True, save_only_model=False, **t.hf_args)


def train_loop(job: dict) -> None:
    """Ray Train entry point; `job` as for the deepspeed worker (launch.fit)."""
    # ------------------------------------------------------------------ setup
    from raysft import checkpoint as ckpt
    from raysft.modeling import collate, param_groups
    from raysft.train import common
    from raysft.train.deepspeed_worker import deepspeed_config
    from raysft.train.metrics import MetricsWriter

    w = common.setup(job, trainer_checkpoints_activations=True)  # SFTConfig's gradient_checkpointing (sft_config)
    cfg, t, c, rank, world, log = w.cfg, w.t, w.c, w.rank, w.world, w.log
    tokenizer, rows, schedule, model, run_dir = w.tokenizer, w.rows, w.schedule, w.model, w.run_dir
    n_params, n_trainable = w.counts
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    ds_config = deepspeed_config(t, c.use_gpu, world)
    del ds_config["optimizer"]  # the Trainer's torch AdamW on the same groups (create_optimizer below)
    accumulation = ds_config["gradient_accumulation_steps"]
    good = ckpt.latest_good(run_dir, warn=log)
    start_step, samples_seen, tokens_seen = 0, 0, 0
    if good is not None:
        state = ckpt.read_state(good)
        start_step, samples_seen, tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        log(f"resume: from {good} at step {start_step} (epoch {state['epoch']}, {samples_seen} rows seen)")

    # ------------------------------------------------------------------ data: this rank's part of every step
    data_time = [0.0]

    def collate_rows(items):
        td = time.time()
        batch = collate({k: [it[k] for it in items] for k in ("input_ids", "labels", "position_ids")},
                        tokenizer.pad_token_id)
        data_time[0] += time.time() - td
        return batch

    micro_batches = [micro for step in range(schedule.total_steps)
                     for micro in schedule.rank_micro_batches(step, rank, world, t.micro_batch_size)]
    loader = DataLoader(rows.ds, batch_sampler=micro_batches, collate_fn=collate_rows, num_workers=0)

    class _Trainer(SFTTrainer):
        step_loss, processed = 0.0, 0

        def get_train_dataloader(self):
            return loader  # not re-sharded by accelerate: the schedule already gave this rank its rows

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr)
            return self.optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.processed += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_loss += loss.item() / world  # TRL multiplied the global-token mean by the world size
            return loss

    # ------------------------------------------------------------------ metrics, eval, checkpoints
    writer = MetricsWriter(cfg.output_dir) if rank == 0 else None
    steps = common.StepMetrics(schedule, rows, world, n_params, model.config, common.gpu_peak(c.use_gpu), start_step,
                               samples_seen, tokens_seen)

    def forward(batch):
        return trainer.model_wrapped(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     use_cache=False).logits

    gate = common.ReportGate(rank)

    class _Raysft(TrainerCallback):
        metrics: dict = {}
        t0 = time.time()

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            stats = torch.tensor([trainer.step_loss, trainer.processed, data_time[0], gate.vote()], dtype=torch.float64,
                                 device=args.device)
            dist.all_reduce(stats)
            trainer.step_loss, trainer.processed, data_time[0] = 0.0, 0, 0.0
            engine = trainer.model_wrapped
            m = steps(step, stats[0].item(), stats[1].item(), stats[2].item(), time.time() - self.t0,
                      trainer.lr_scheduler.get_last_lr()[0], float(engine.get_global_grad_norm() or 0.0))
            due = common.eval_and_log(m, w, forward, engine, args.device, start_step, writer)
            self.metrics = m
            if due:
                control.should_save = True  # the Trainer saves, then calls on_save
                return control
            if step % t.log_every_steps == 0 or "eval_loss" in m:
                gate.report(m, stats[3].item())
            common.maybe_fail(job, cfg, step, rank)
            return control

        def on_save(self, args, state, control, **kw):
            step, final = state.global_step, state.global_step == schedule.total_steps
            local = tempfile.mkdtemp(prefix="raysft-ckpt-")
            shutil.move(os.path.join(args.output_dir, f"checkpoint-{step}"), os.path.join(local, "model"))
            if final:
                trainer.model_wrapped.eval()
                probe = common.probe(forward, rows, args.device)
                trainer.model_wrapped.train()
            if rank == 0:
                if final:
                    torch.save(probe, os.path.join(local, "probe.pt"))
                common.write_run_files(local, cfg, job, common.checkpoint_state(w, job, steps, step, "hf"))
            common.report_checkpoint(local, step, self.metrics, w, job, gate)
            common.maybe_fail(job, cfg, step, rank)
            return control

    # ------------------------------------------------------------------ train
    output_dir = tempfile.mkdtemp(prefix=f"raysft-hf-rank{rank}-")  # per rank: checkpoints move out at once
    args = sft_config(cfg, output_dir, ds_config, accumulation, schedule.total_steps)
    trainer = _Trainer(model=model, args=args, train_dataset=rows.ds, processing_class=tokenizer,
                       callbacks=[_Raysft()])
    trainer.remove_callback(PrinterCallback)  # raysft prints its own step lines
    log(common.setup_line(n_params, n_trainable, t.lora.r, len(rows), schedule, world, t.micro_batch_size,
                          accumulation, t.zero_stage, t.dtype, "hf (TRL SFTTrainer)"))
    trainer.train(resume_from_checkpoint=os.path.join(good, "model") if good else None)
    if writer:
        writer.close()
    shutil.rmtree(output_dir, ignore_errors=True)
