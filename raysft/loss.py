"""The training loss, computed from the final hidden states: the model never returns full logits in training.

`attach(model, kind)` (before LoRA wraps the model) gives it one more way to be called:
`model(input_ids=..., position_ids=..., labels=..., loss_sum=True)` returns the *sum* of next-token cross-entropy
over the trained tokens (labels != -100), the numerator of the global-batch mean both workers divide by the global
batch's trained-token count. Without `loss_sum` the forward is the model's own (logits; generation unchanged).

- `chunked` (the default): TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, the one TRL's SFTTrainer
  uses): the output head is applied in vocabulary tiles, fp32 log-sum-exp folded tile by tile and recomputed in the
  backward, so peak memory does not grow with seq x vocab. It handles tied heads, PEFT's `modules_to_save` head,
  ZeRO-3 (the head's weight gathered for the call), logit soft-capping and scaling. On CUDA it scores only the
  positions whose next label is trained.
- `liger`: liger-kernel's fused linear cross-entropy (Triton, CUDA only) on the trained positions.
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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained tokens, from full logits (the `none` path)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def attach(model, kind: str) -> None:
    """Give `model` (a transformers causal LM, not yet wrapped by PEFT) the `loss_sum=True` call of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"fused_loss: {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "chunked":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    model_forward = model.forward

    @functools.wraps(type(model).forward)  # the model's own signature: `generate` checks its kwargs against it
    def forward(self, *args, loss_sum: bool = False, labels=None, **kwargs):
        if not loss_sum:
            return model_forward(*args, **({"labels": labels} if labels is not None else {}), **kwargs)
        kwargs["use_cache"] = False
        if kind == "chunked":  # TRL's loss is -sum(log p) / num_items_in_batch
            return model_forward(*args, labels=labels, fused_lm_head=True, num_items_in_batch=1, **kwargs).loss
        if kind == "none":
            return token_loss_sum(model_forward(*args, **kwargs).logits, labels)
        return _liger_loss_sum(self, labels, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


def loss_sum(model, batch: dict) -> torch.Tensor:
    """The summed loss of a collated batch (`modeling.collate`) through `model` (or the engine wrapping it)."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 loss_sum=True)


def _liger_loss_sum(model, labels, *args, **kwargs) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy on the positions whose next label is trained."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)(
            head.weight, hidden[keep], targets[keep], head.bias)
