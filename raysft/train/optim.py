"""The optimizer side every backend shares, each defined once: AdamW (`adamw`), the learning-rate scheduler
(`scheduler`), and the generated DeepSpeed config of the backends that run DeepSpeed.

The deepspeed backend hands `adamw` and `scheduler` to `deepspeed.initialize` with the config; the hf backend's
Trainer builds them through the same functions (hf_trainer.ScheduledSFTTrainer) and hands the config to TRL's
SFTConfig; the fsdp backend steps them itself. Batch sizes come from `BatchShape`.
"""

from __future__ import annotations

from raysft.train.schedule import BatchShape

NO_PRINT = 2**31 - 1  # DeepSpeed's steps_per_print: raysft prints its own step lines


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested mappings merged key by key.

    >>> deep_merge({"zero": {"stage": 2, "x": 1}}, {"zero": {"stage": 3}})
    {'zero': {'stage': 3, 'x': 1}}
    """
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(train, use_gpu: bool, shape: BatchShape) -> dict:
    """DeepSpeed config generated from `train.*`, with the user's `train.deepspeed_config` merged over it."""
    zero = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config = {
        "train_batch_size": shape.global_batch_size * train.sequence_parallel_size,
        "train_micro_batch_size_per_gpu": shape.micro_batch_size,
        # under sequence parallelism each rank runs its group's micro-batches, a slice of each, in turn
        "gradient_accumulation_steps": shape.accumulation * train.sequence_parallel_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.dtype == "bf16"},
        "fp16": {"enabled": train.dtype == "fp16", "loss_scale": 0},
        # the optimizer is `adamw`'s torch AdamW, handed to DeepSpeed (no fused/CPU-Adam extension to compile)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": NO_PRINT,
    }
    return deep_merge(config, train.deepspeed_config)


def lr_scheduler_name(name: str) -> str:
    """train.lr_scheduler as transformers names it (its "constant" ignores warmup).

    >>> lr_scheduler_name("constant"), lr_scheduler_name("cosine")
    ('constant_with_warmup', 'cosine')
    """
    return "constant_with_warmup" if name == "constant" else name


def adamw(model, train):
    """The optimizer of every backend: torch's AdamW at `train.lr` on `modeling.param_groups` (no weight decay on
    biases and norms)."""
    import torch

    from raysft.modeling import param_groups

    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr)


def scheduler(optimizer, train, total_steps: int):
    """The learning-rate schedule of every backend: `train.lr_scheduler` with `train.warmup_steps` over the run."""
    from transformers import get_scheduler

    return get_scheduler(lr_scheduler_name(train.lr_scheduler), optimizer, num_warmup_steps=train.warmup_steps,
                         num_training_steps=total_steps)
