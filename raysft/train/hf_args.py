"""`train.hf_args` and the SFTConfig of a run: which TRL settings raysft owns, the check of the user's own
(run on the driver, before Ray starts), and the SFTConfig the hf backend hands TRL's SFTTrainer.
"""

from __future__ import annotations

from raysft.train.optim import lr_scheduler_name
from raysft.train.schedule import BatchShape

TRL_DOCS = "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig"

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
    "torch_compile": "train.compile",
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
                                         f"see {TRL_DOCS}"))
    if problems:
        raise ConfigError(problems)


def sft_config(t, use_gpu: bool, output_dir: str, ds_config: dict, shape: BatchShape, total_steps: int):
    """The SFTConfig of a run from `train.*` (`t`): raysft's settings, then train.hf_args (checked by
    `check_hf_args`)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=shape.micro_batch_size,
        gradient_accumulation_steps=shape.accumulation, max_steps=total_steps,
        learning_rate=t.lr, lr_scheduler_type=lr_scheduler_name(t.lr_scheduler),
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim="adamw_torch", bf16=t.dtype == "bf16", fp16=t.dtype == "fp16", seed=t.seed, data_seed=t.seed,
        deepspeed=ds_config, gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", eval_strategy="no", logging_strategy="steps", logging_steps=t.log_every_steps,
        report_to="none", disable_tqdm=True, use_cpu=not use_gpu, dataloader_num_workers=0,
        packing=False, max_length=None, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
        average_tokens_across_devices=True, save_only_model=False, torch_compile=t.compile, **t.hf_args)


