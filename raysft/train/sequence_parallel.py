"""Long rows on the deepspeed backend, with DeepSpeed's Arctic Long Sequence Training (ALST) pieces.

- Sequence parallelism (`train.sequence_parallel_size: N`, Ulysses). `setup` makes groups of N consecutive ranks
  (`deepspeed.runtime.sequence_parallel.parallel_state_sp`) and puts DeepSpeed's `UlyssesSPAttentionHF` in front of
  the model's attention kernel (the entry of transformers' `ALL_ATTENTION_FUNCTIONS` the model calls): each rank
  holds 1/N of the sequence, and around the kernel an all-to-all trades sequence for heads, so that each rank
  attends over the whole sequence for 1/N of the heads. `shard` hands a step's micro-batches to DeepSpeed's
  `UlyssesSPDataLoaderAdapter`: it gathers the micro-batches of the group's N ranks and gives each rank its slice
  of every one of them, in turn (with `shift_labels`, the labels shifted before slicing, and the position ids that
  restart at each packed example); so each rank runs N times the micro-batches it was scheduled, one slice each.
  Packed examples stay apart: DeepSpeed drops the mask transformers made for the local slice; raysft's kernel
  (`packed_attention`) rebuilds a block-diagonal causal mask from the gathered global position ids for sdpa
  (the flash kernels read the same position ids as sequence boundaries themselves). Outside training (eval,
  generation) rows are whole and the model's kernel runs unchanged.
  Data parallelism is over all ranks, as DeepSpeed sees them (no `mpu` is handed to it): the schedule, the loss
  normalisation and the checkpoint layout are those of N=1, so a checkpoint resumes with any N. The gradients are
  right because each rank's loss is the sum over its slices' trained tokens / the global batch's trained tokens,
  and the all-to-all's backward returns to each rank the gradient of the other ranks' losses through its own
  activations: the ranks' gradients sum to the gradient of the global batch's loss, as with N=1.
- Tiled MLP (`train.tiled_mlp`): each decoder layer's MLP runs through DeepSpeed's `TiledMLP`, a slice of the
  sequence at a time in forward, and again per slice in backward: the MLP's intermediate activations (the widest
  of a layer) exist for one slice only.
- Activation offload (`train.offload_activations`, with gradient checkpointing): each checkpointed decoder layer's
  input waits for backward in CPU memory (torch's `save_on_cpu`; `offload_activations` says why not DeepSpeed's
  `checkpoint_in_cpu`).
The loss (`raysft.loss`, chunked by default) runs on each rank's slice of the hidden states.

Tested (tests/test_sequence_parallel.py): with 2 ranks on gloo, SP=2's loss and every gradient equal one process's
on the same rows within 1e-5, and a packed row's logits under SP equal each example's alone; Ray runs with SP=2
match SP=1's losses, resume with SP=1 on the next rows, and end bit-identical after a SIGKILL.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch

from raysft.modeling import FLASH_PACKAGES


def head_counts(config) -> tuple[int, int]:
    """(attention heads, key/value heads) of a transformers config (its text model's)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    return heads, getattr(text, "num_key_value_heads", None) or heads


def model_problem(config, size: int):
    """Why a model of this (transformers) config cannot be split over `size` ranks' heads, as (what, fix), or None.
    Ulysses gives each rank heads/size query heads, and kv_heads/size key/value heads (or replicates them when the
    model has fewer key/value heads than size)."""
    heads, kv = head_counts(config)
    sizes = ", ".join(str(d) for d in range(2, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0))
    fix = f"use a sequence_parallel_size this model splits into: {sizes or 'none above 1'}"
    if heads % size:
        return f"the model's {heads} attention heads (num_attention_heads) are not divisible by {size}", fix
    if kv % size and size % kv:
        return f"the model's {kv} key/value heads (num_key_value_heads) and {size} do not divide one another", fix
    return None


def block_causal_mask(position_ids: torch.Tensor, sliding_window=None):
    """[b, 1, S, S] boolean mask (True: attend) keeping each packed example (position ids restarting at 0, counting
    up by one) to itself, causal within it, and within `sliding_window` tokens when the layer has one; None when
    plain causal attention is the same (no row holds more than one example, no window).
    Built in place: one S x S boolean per row (query i attends key j when i - pos_i <= j <= i)."""
    starts = position_ids == 0
    if int(starts.sum(dim=1).max()) <= 1 and not sliding_window:
        return None
    n = position_ids.shape[1]
    index = torch.arange(n, device=position_ids.device)
    first = index - position_ids  # where each query's example begins
    mask = (index[None, None, :] >= first[:, :, None]).tril_()
    if sliding_window:
        mask.triu_(-(sliding_window - 1))
    return mask[:, None]


def packed_attention(kernel, implementation: str):
    """The attention kernel UlyssesSPAttentionHF calls on the whole sequence: `kernel`, given the block-diagonal mask
    from the gathered position ids (sdpa; one mask per forward, reused by every layer that has the same window and
    by the recompute of checkpointed layers), or the position ids alone (flash, which reads them as boundaries)."""
    cache: dict = {}

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if implementation not in FLASH_PACKAGES:
            position_ids, window = kwargs["position_ids"], kwargs.get("sliding_window")
            key_ = (position_ids.data_ptr(), tuple(position_ids.shape), window)
            if cache.get("key") != key_ or not torch.equal(cache["positions"], position_ids):
                cache.update(key=key_, positions=position_ids.clone(), mask=block_causal_mask(position_ids, window))
            attention_mask = cache["mask"]
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


_KERNELS: dict = {}  # the model's own attention kernels, before setup replaced them (a process sets up once)


@dataclass
class SequenceParallel:
    size: int
    rank: int  # in the group
    group: object  # torch.distributed ProcessGroup
    device: object
    pad_id: int

    def shard(self, micro_batches: list[dict]) -> list[dict]:
        """This rank's slices of its group's micro-batches: len(micro_batches) x size of them, on the device.

        The group's k-th micro-batches are first padded to the longest of them: the adapter all-gathers each rank's
        micro-batch, and gloo's all_gather takes equal sizes only ("ProcessGroupGloo::allgather: invalid tensor
        size at index 1 (expected (1, 50), got (1, 48))" without it)."""
        import torch.distributed as dist
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        lengths = torch.tensor([b["input_ids"].shape[1] for b in micro_batches], device=self.device)
        dist.all_reduce(lengths, op=dist.ReduceOp.MAX, group=self.group)
        padded = [pad(b, int(n), self.pad_id) for b, n in zip(micro_batches, lengths.tolist())]
        adapter = UlyssesSPDataLoaderAdapter(padded, sp_rank=self.rank, sp_group=self.group,
                                             sp_world_size=self.size, device=self.device)
        return [{k: v.to(self.device) for k, v in batch.items()} for batch in adapter]


def pad(batch: dict, n: int, pad_id: int) -> dict:
    """A collated batch (modeling.collate) padded on the right to length `n`: pad tokens, untrained, their position
    ids restarting at 0 (an example of their own, which no real token attends to)."""
    import torch.nn.functional as F

    from raysft.data.tokenize import IGNORE_INDEX

    ids = batch["input_ids"]
    extra = n - ids.shape[1]
    if extra <= 0:
        return batch
    positions = torch.arange(extra, device=ids.device).expand(ids.shape[0], extra)
    return {"input_ids": F.pad(ids, (0, extra), value=pad_id),
            "labels": F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
            "position_ids": torch.cat([batch["position_ids"], positions], dim=1)}


def setup(model, size: int, micro_batch_size: int, device, pad_id: int) -> SequenceParallel:
    """Groups of `size` consecutive ranks, and Ulysses attention around `model`'s attention kernel. Collective: every
    rank calls it, after the process group is up and before the model's first forward."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # over torch's group
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    group = mpu.get_sequence_parallel_group()
    config = model.config.get_text_config()
    heads, kv = head_counts(config)
    implementation = config._attn_implementation
    kernel = _KERNELS.setdefault(implementation, ALL_ATTENTION_FUNCTIONS[implementation])
    ulysses = UlyssesSPAttentionHF(
        attn=packed_attention(kernel, implementation), batch_size=micro_batch_size,
        attn_head_count=heads, attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
        kv_head_count=kv, num_hidden_layers=config.num_hidden_layers, process_group=group, seq_length_is_variable=True)
    ulysses.core_attn_implementation = implementation

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not module.training:  # eval and generation: whole rows on every rank
            module.num_key_value_groups = heads // kv  # Ulysses rewrites it when it replicates key/value heads
            return kernel(module, query, key, value, attention_mask, *args, **kwargs)
        return ulysses(module, query, key, value, None, *args, **kwargs)

    # The model's own entry is wrapped rather than a new key registered through AttentionInterface: transformers
    # also picks the attention mask's builder and the flash kernels' varlen path by the implementation's name, so a
    # new name would need a mask function and those checks of its own, and would change eval and generation, which
    # must run the model's kernel unchanged (above). The entry is one per worker process, and a worker holds one model.
    ALL_ATTENTION_FUNCTIONS[implementation] = attention
    return SequenceParallel(size, dist.get_rank(group), group, device, pad_id)


def tile_mlp(model, shards: int = 0) -> int:
    """Run every decoder layer's MLP (the modules named `mlp`) through DeepSpeed's TiledMLP: ceil(seq / hidden)
    slices of the sequence (`shards` instead, when given), the largest count over all ranks, so that every rank
    runs as many tiles (TiledMLP marks a parameter's gradient ready for ZeRO at the last tile, and ZeRO-3 gathers
    parameters per tile). The input is padded to a multiple of the count first: `torch.chunk` makes fewer chunks
    than asked when the length does not divide evenly (1000 rows in 37 chunks: 36), and a rank would then never
    reach its last tile. Returns how many MLPs were tiled."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled(mlp_forward):
        def forward(self, x):
            n = x.shape[-2]
            count = torch.tensor(shards or math.ceil(n / x.shape[-1]), device=x.device)
            if dist.is_initialized():
                dist.all_reduce(count, op=dist.ReduceOp.MAX)
            count = int(count)
            params = list(self.parameters())
            if torch.is_grad_enabled() and not x.requires_grad and any(p.requires_grad for p in params):
                # TiledMLP's parameters travel in a list autograd does not see: without an input that requires
                # grad (frozen embeddings, LoRA on the MLP only) its output would have no gradient at all
                x = x.detach().requires_grad_()
            extra = -n % count
            padded = F.pad(x, (0, 0, 0, extra)) if extra else x  # the MLP is per token: padding changes no output
            out = TiledMLP.apply(mlp_forward, self, padded, count, params)
            return out[..., :n, :] if extra else out
        return forward

    mlps = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"]
    for mlp in mlps:
        mlp.forward = types.MethodType(tiled(type(mlp).forward), mlp)
    return len(mlps)


def offload_activations(model) -> None:
    """Checkpoint `model`'s decoder layers (torch's non-reentrant checkpoint) inside torch's
    `torch.autograd.graph.save_on_cpu`: the tensors the checkpoint keeps for backward, each layer's input, wait in
    CPU memory (pinned on CUDA). transformers' `activation_checkpointing_enable(offload=True)` does the same but
    pins unconditionally, which fails on a CPU-only machine ("pin_memory=True requires a CUDA or other accelerator
    backend"); DeepSpeed's `checkpoint_in_cpu` breaks on a CPU device (its copy to CPU is the tensor itself, which it
    then empties in `get_cpu_activations_for_backward`: "IndexError: Dimension out of range" in backward)."""
    from torch.utils.checkpoint import checkpoint

    def offloaded(function, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    model.activation_checkpointing_enable({"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = offloaded
