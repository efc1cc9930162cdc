"""The training loss, computed from the final hidden states: the model never returns full logits in training.

`attach(model, kind)` (before LoRA wraps the model) gives it one more way to be called:
`model(input_ids=..., position_ids=..., labels=..., loss_sum=True)` returns the *sum* of next-token cross-entropy
over the trained tokens (labels != -100), the numerator of the global-batch mean every backend divides by the global
batch's trained-token count. Without `loss_sum` the forward is the model's own (logits; generation unchanged).

- `chunked` (the default): only the positions whose next label is trained are kept; the output head is applied to
  them a chunk of positions at a time (`CHUNK_ELEMENTS` logits at most), cross-entropy in fp32 per chunk, and the
  gradients of the hidden states, head weight and bias are accumulated chunk by chunk during the forward
  (`ChunkedCrossEntropy`, the scheme of Liger's fused linear cross-entropy, in plain torch: any device). Peak memory
  is one chunk's logits plus the head's gradient, whatever seq x vocab. Tied heads, PEFT's `modules_to_save` head,
  ZeRO-3 (the head's weight gathered for the call with TRL's `maybe_gather_lm_head_ctx`, used once in the graph),
  `logit_scale` and `final_logit_softcapping` are handled.
- `liger`: liger-kernel's fused linear cross-entropy (Triton, CUDA only) on the same trained positions.
- `none`: the model's full logits, cast to fp32, then cross-entropy: the path before chunking, kept for comparison.

Tested (tests/test_loss.py): loss and every parameter's gradient of `chunked` equal `none` within 1e-6 relative.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from raysft.data.tokenize import IGNORE_INDEX

KINDS = ("chunked", "liger", "none")
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MB in fp32): 220 positions of a 152k vocabulary
# output scalings some families apply to the logits that the fused paths do not (those use `none`)
UNSUPPORTED_SCALES = ("output_multiplier", "lm_head_multiplier", "logits_scaling")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift_labels=None) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained tokens, from full logits (the `none` path); with
    `shift_labels` (each position's next label, as sequence parallelism slices them) instead of `labels`."""
    if shift_labels is not None:
        return F.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def global_mean_part(loss_sum: torch.Tensor, n_trained: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss normalisation of every backend, once: a micro-batch's summed loss over the trained tokens of the
    whole global batch (all micro-batches, all workers; every rank knows the count without communication, the
    global batch being a function of the step) is its part of the global batch's mean. Backward runs on that part
    times the world size, because every backend's gradient reduction averages over ranks (DeepSpeed's all-reduce,
    FSDP2's reduce-scatter; TRL's `average_tokens_across_devices` scales the same way), and is not divided by the
    accumulation steps: the update is that of the mean over the global batch, whatever the packing, accumulation
    and worker count. Returns (the part, what backward runs on).

    >>> [x.item() for x in global_mean_part(torch.tensor(6.0), 12, 2)]
    [0.5, 1.0]
    """
    part = loss_sum / n_trained
    return part, part * world


def attach(model, kind: str) -> None:
    """Give `model` (a transformers causal LM, not yet wrapped by PEFT) the `loss_sum=True` call of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"fused_loss: {kind!r} is not one of {', '.join(KINDS)}")
    text_config = model.config.get_text_config()
    unsupported = [k for k in UNSUPPORTED_SCALES if getattr(text_config, k, None) is not None]
    if kind != "none" and unsupported:
        raise ValueError(f"fused_loss: {kind} does not apply this model's {unsupported[0]}; use train.fused_loss=none")
    scale = getattr(text_config, "logit_scale", None) or 1.0
    softcap = getattr(text_config, "final_logit_softcapping", None)
    model_forward = model.forward

    @functools.wraps(type(model).forward)  # the model's own signature: `generate` checks its kwargs against it
    def forward(self, *args, loss_sum: bool = False, labels=None, shift_labels=None, **kwargs):
        if not loss_sum:
            return model_forward(*args, **({"labels": labels} if labels is not None else {}), **kwargs)
        kwargs["use_cache"] = False
        if kind == "none":
            return token_loss_sum(model_forward(*args, **kwargs).logits, labels, shift_labels)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        # shift_labels: a sequence-parallel slice's labels, shifted before slicing (each position's next token)
        hidden, targets = (hidden, shift_labels) if shift_labels is not None else (hidden[:, :-1], labels[:, 1:])
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]  # the trained positions only
        head = self.get_output_embeddings()
        from trl.trainer.utils import maybe_gather_lm_head_ctx  # here: DS_ACCELERATOR is set before trl loads

        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            if kind == "liger":
                return _liger(head, hidden, targets, softcap)
            grads = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
            return ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, targets, scale, softcap, grads)

    model.forward = types.MethodType(forward, model)


def loss_sum(model, batch: dict) -> torch.Tensor:
    """The summed loss of a collated batch (`modeling.collate`, or its sequence-parallel slice with `shift_labels`)
    through `model` (or the engine wrapping it)."""
    labels = {k: batch[k] for k in ("labels", "shift_labels") if k in batch}
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], loss_sum=True, **labels)


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(scale * hidden @ weight.T + bias, targets)) over [n, H] hidden states, with the logits made
    `CHUNK_ELEMENTS` at a time in fp32; the gradients are computed in the same pass (when `grads`) and handed back
    in `backward`, so no chunk's logits are kept for it and the head's weight is read once per chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float, softcap, grads: bool):
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_h, need_w, need_b = (grads and ctx.needs_input_grad[i] for i in range(3))
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n, chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            z = F.linear(h, weight, bias).float()
            if scale != 1.0:
                z.mul_(scale)
            capped = None
            if softcap:
                capped = torch.tanh(z.div_(softcap))
                z = capped * softcap
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if capped is not None:
                g.mul_(1.0 - capped * capped)
            if scale != 1.0:
                g.mul_(scale)
            if need_h:
                grad_h[start:start + chunk] = g.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(g.t(), h.float())  # accumulated in fp32
            if need_b:
                grad_b += g.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def _liger(head, hidden, targets, softcap) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (CUDA), summed."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)(
        head.weight, hidden, targets, head.bias)
