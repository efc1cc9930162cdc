"""Building the model and batches the same way everywhere (workers, export, tests).

`build_model` loads a causal LM from a hub id or folder (or initialises it from its config with the seed),
and grows its embeddings when the tokenizer gained the ChatML tokens. `collate` turns prepared rows into
tensors: padded to the micro-batch's longest row, labels padded with -100, and position_ids restarting
per example, with no attention mask and no KV cache, so that transformers keeps attention inside each
packed example (`masking_utils.find_packed_sequence_indices`, which it only applies when both are absent;
flash-attention's varlen path reads the same position_ids, in a micro-batch laid end to end as one row:
`flatten`). Tested: a packed row's logits equal each example's logits alone. `resolve_attention` turns
`model.attn_implementation: auto` into a kernel.
The loss is `raysft.loss`'s.
"""

from __future__ import annotations

import importlib.util

import torch

from raysft.data.tokenize import IGNORE_INDEX

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}  # fp16: DeepSpeed casts


def build_model(name_or_path: str, vocab_size: int, *, from_scratch: bool = False, seed: int = 0,
                dtype: str = "fp32", attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                gradient_checkpointing: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if from_scratch:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn_implementation,
                                                     dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    # No KV cache in training: with one, transformers skips the packed-sequence mask (it only derives it when
    # past_key_values is None) and attention would cross the examples of a packed row.
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def collate(rows: dict, pad_id: int, device="cpu", multiple: int = 1, flat: bool = False) -> dict:
    """Rows (dict of lists: input_ids, labels, position_ids) -> padded tensors, no attention mask; the length
    padded up to a multiple of `multiple` (sequence parallelism slices it in equal parts); `flat`: the rows then
    laid end to end as one row (`flatten`)."""
    n = -(-max(len(x) for x in rows["input_ids"]) // multiple) * multiple
    b = len(rows["input_ids"])
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, n), dtype=torch.long)
    for i, (ids, lab, pos) in enumerate(zip(rows["input_ids"], rows["labels"], rows["position_ids"])):
        k = len(ids)
        input_ids[i, :k] = torch.as_tensor(ids)
        labels[i, :k] = torch.as_tensor(lab)
        position_ids[i, :k] = torch.as_tensor(pos)
        position_ids[i, k:] = torch.arange(n - k)  # padding is its own "example": no real token attends to it
    batch = {"input_ids": input_ids.to(device), "labels": labels.to(device), "position_ids": position_ids.to(device)}
    return flatten(batch) if flat else batch


def flatten(batch: dict) -> dict:
    """A micro-batch of b rows as one row of b x length tokens. The flash-attention kernels find a packed row's
    examples from its restarting position ids only in a batch of one row (transformers' `_is_packed_sequence`:
    with more, they attend causally over each whole row, across its examples); laid end to end the examples stay
    apart, and the loss is the same: every row starts an example, whose first token is never trained."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}


def flat_batches(attention: str, micro_batch_size: int) -> bool:
    """Whether micro-batches go to the model as one row (`flatten`): a flash-attention kernel and more than one row.

    >>> flat_batches("flash_attention_2", 4), flat_batches("flash_attention_2", 1), flat_batches("sdpa", 4)
    (True, False, False)
    """
    return attention in FLASH_PACKAGES and micro_batch_size > 1


# the flash-attention kernels transformers offers, and the package each needs (CUDA only)
FLASH_PACKAGES = {"flash_attention_3": "flash_attn_interface", "flash_attention_2": "flash_attn"}


def attention_available(on_cuda: bool) -> list[str]:
    """The attention implementations this machine can run: sdpa, eager and flex_attention everywhere (flex trains
    on CUDA only), and on CUDA the flash kernels whose package is installed."""
    return ["sdpa", "eager", "flex_attention"] + [impl for impl, package in reversed(FLASH_PACKAGES.items())
                                                   if on_cuda and importlib.util.find_spec(package)]


def resolve_attention(requested: str, on_cuda: bool) -> tuple[str, str]:
    """(implementation, why) for `model.attn_implementation`. Every choice keeps a packed row's examples apart:
    flash-attention reads the restarting position_ids as sequence boundaries (varlen), sdpa and flex_attention get
    transformers' block-diagonal mask. `auto`: flash_attention_3 (Hopper and newer) or flash_attention_2 when the
    package is installed on a CUDA worker, else sdpa (on CPU the fastest exact one, bench/attention.py).

    >>> resolve_attention("auto", on_cuda=False)
    ('sdpa', 'auto: no CUDA')
    >>> resolve_attention("eager", on_cuda=True)
    ('eager', 'as configured')
    """
    if requested != "auto":
        return requested, "as configured"
    if not on_cuda:
        return "sdpa", "auto: no CUDA"
    available = attention_available(on_cuda)
    if "flash_attention_3" in available and torch.cuda.get_device_capability()[0] >= 9:
        return "flash_attention_3", "auto: flash-attn 3 installed, Hopper or newer"
    if "flash_attention_2" in available:
        return "flash_attention_2", "auto: flash-attn 2 installed"
    return "sdpa", "auto: no flash-attn package installed (sdpa with a block-diagonal mask)"


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups exactly as Hugging Face's Trainer makes them (no decay on biases and norm
    weights), so that the deepspeed and hf backends run the same optimizer. Frozen parameters are left out."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # `self` is unused by that method
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def peft_config(lora):
    """`train.lora` -> peft.LoraConfig (None when LoRA is off)."""
    if not lora.r:
        return None
    from peft import LoraConfig, TaskType

    targets = lora.target_modules
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else list(targets))


def vocab_grows(name_or_path: str, vocab_size: int, trust_remote_code: bool = False) -> bool:
    """Whether a tokenizer of `vocab_size` tokens (the ChatML tokens added) outgrows the model's embeddings."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return vocab_size > getattr(config.get_text_config(), "vocab_size", 0)


def apply_lora(model, lora, vocab_grew: bool = False):
    """The model with LoRA adapters (only they train), or the model itself when train.lora.r is 0.

    When the tokenizer gained the ChatML tokens (`vocab_grew`), the input embeddings are trained and saved with
    the adapter too: otherwise the new tokens' embeddings would stay at their initial values.
    """
    config = peft_config(lora)
    if config is None:
        return model
    from peft import get_peft_model

    if vocab_grew:
        config.modules_to_save = ["embed_tokens", "lm_head"]
    return get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))
