"""Building the model and batches the same way everywhere (workers, export, tests).

`build_model` loads a causal LM from a hub id or folder (or initialises it from its config with the seed),
and grows its embeddings when the tokenizer gained the ChatML tokens. `collate` turns prepared rows into
tensors: padded to the micro-batch's longest row, labels padded with -100, and position_ids restarting
per example, with no attention mask and no KV cache, so that transformers keeps attention inside each
packed example (`masking_utils.find_packed_sequence_indices`, which it only applies when both are absent;
flash-attention's varlen path reads the same position_ids). Tested: a packed row's logits equal each
example's logits alone.
`token_loss_sum` is the summed next-token loss over trained tokens, the numerator of the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def collate(rows: dict, pad_id: int, device="cpu") -> dict:
    """Rows (dict of lists: input_ids, labels, position_ids) -> padded tensors, no attention mask."""
    n = max(len(x) for x in rows["input_ids"])
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
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "position_ids": position_ids.to(device)}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained tokens (labels != -100)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
