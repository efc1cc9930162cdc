"""The fsdp backend: PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`, DTensor parameters) and its
distributed checkpoint (DCP), under raysft's loop (loop.py), on the deepspeed backend's contracts.

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

Loss: `loss.global_mean_part`'s (FSDP2's reduce-scatter averages gradients over ranks). The chunked loss reads the
output head inside the root's forward, where FSDP2 has gathered the root's parameters: no full-vocabulary logits.
Optimizer: `optim.adamw` on the sharded parameters, clipped by the loop's norm (`clip_grad_norm_` on the DTensor
gradients), `optim.scheduler`.

Checkpoints (raysft/checkpoint.py's contract): `model/` is a DCP checkpoint (`get_state_dict` of model and
optimizer, and the scheduler's state) that every rank writes its shard of (`__{rank}_0.distcp`, rank 0 the
`.metadata`), plus the model's config.json; `rng/rank{r}.pt`. DCP reshards on load, so a run resumes on another
worker count directly. With LoRA the frozen base is left out (`ignore_frozen_params`): checkpoints hold what trains.
"""

from __future__ import annotations

from typing import Optional

from raysft import checkpoint as ckpt
from raysft.train import context
from raysft.train.context import Worker
from raysft.train.metrics import setup_line
from raysft.train.optim import adamw, scheduler


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


class Backend:
    def __init__(self, w: Worker, device, good: Optional[str], state):
        t, self.w = w.cfg.train, w
        self.module = self.engine = shard(w.model, t, w.cfg.cluster.use_gpu, w.world)
        self.optimizer = adamw(self.module, t)
        self.scheduler = scheduler(self.optimizer, t, w.schedule.total_steps)
        self.trained = [p for p in self.module.parameters() if p.requires_grad]
        self.lora = bool(t.lora.r)
        w.log(setup_line(w.n_params, w.n_trainable, t.lora.r, len(w.rows), w.schedule, w.shape,
                         sharding_name(t.zero_stage), t.dtype, "fsdp"))

    def _state(self) -> tuple[dict, object, object]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        options = state_options(self.lora)
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict()}, options

    def restore(self, good: str, state) -> str:
        """Model, optimizer and scheduler from the DCP checkpoint at `good`, resharded to this worker group."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        saved, options = self._state()
        dcp.load(saved, checkpoint_id=ckpt.model_dir(good))
        set_state_dict(self.module, self.optimizer, model_state_dict=saved["model"],
                       optim_state_dict=saved["optimizer"], options=options)
        self.scheduler.load_state_dict(saved["scheduler"])
        n = state.world_size
        return f", written by {n} worker{'s' if n > 1 else ''}, resharded by DCP" if n != self.w.world else ""

    def micro_batches(self, item):
        return item.micro_batches

    def forward_backward(self, batch: dict, n_trained: int):
        from raysft.loss import global_mean_part, loss_sum

        part, scaled = global_mean_part(loss_sum(self.module, batch), n_trained, self.w.world)
        scaled.backward()
        return part.detach()

    def optimizer_step(self, clip):
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.trained, clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.scheduler.get_last_lr()[0], norm.item()

    def save(self, local: str, step: int) -> None:
        """Every rank's shard of the DCP checkpoint. Each rank writes into its own folder; the shards' names are
        distinct and .metadata (rank 0's) names them relative to the folder, so Ray Train's merge of the ranks'
        folders in storage is the whole checkpoint."""
        import torch.distributed.checkpoint as dcp

        saved, _ = self._state()
        dcp.save(saved, checkpoint_id=ckpt.model_dir(local))

    def logits(self, batch: dict):
        return self.module(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    def train(self, on: bool) -> None:
        self.module.train(on)
