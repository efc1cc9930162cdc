"""Checkpoint -> Hugging Face model folder; and `raysft generate` on such a folder.

The folder holds safetensors weights (ZeRO shards consolidated by DeepSpeed's own `zero_to_fp32`), the
model config, a generation config whose eos includes `<|im_end|>`, and the tokenizer with a ChatML
`chat_template` that renders exactly as raysft's templating does.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from raysft import checkpoint as ckpt
from raysft.errors import UserError, format_error

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def consolidated_state_dict(model_dir: str, zero_stage: int) -> dict:
    """fp32 weights from a DeepSpeed checkpoint folder (every rank's files present)."""
    import torch

    with open(os.path.join(model_dir, "latest"), encoding="utf-8") as f:
        tag = f.read().strip()
    if zero_stage == 0:
        # DeepSpeed's own file holds non-tensor state too; it is this run's own checkpoint (verified by checksum)
        states = torch.load(os.path.join(model_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(model_dir, tag=tag)


def export(checkpoint_path: str, out_dir: str, log: Callable[[str], None] = print) -> str:
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from raysft.config import from_dict
    from raysft.data.chatml import CHAT_TEMPLATE, IM_END

    problem = ckpt.verify(checkpoint_path)
    if problem is not None:
        raise UserError(format_error(checkpoint_path, "not a whole checkpoint", fix=f"{problem}; export another one"))
    state = ckpt.read_state(checkpoint_path)
    with open(os.path.join(checkpoint_path, "config.yaml"), encoding="utf-8") as f:
        cfg = from_dict(yaml.safe_load(f))
    model_dir = os.path.join(checkpoint_path, "model")
    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = True  # off in training (see modeling.build_model), on for generation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = consolidated_state_dict(model_dir, state["zero_stage"])
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{checkpoint_path}: weights do not match the model (missing {missing}, unexpected "
                           f"{unexpected})")
    model.tie_weights()
    model.to(getattr(torch, DTYPE_NAMES[cfg.train.dtype]))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(checkpoint_path, "tokenizer"))
    tokenizer.chat_template = CHAT_TEMPLATE
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = [im_end] + [tokenizer.eos_token_id] * (tokenizer.eos_token_id not in (None, im_end))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=config.bos_token_id)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "raysft.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoint": checkpoint_path, "step": state["step"], "fingerprint": state["fingerprint"]}, f)
    log(f"export: {checkpoint_path} -> {out_dir} (step {state['step']})")
    return out_dir


def generate(model_dir: str, prompt: str, max_new_tokens: int = 128, system_message=None) -> str:
    """Render the prompt as in training, generate greedily until `<|im_end|>`, return the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from raysft.data.chatml import render_prompt
    from raysft.data.tokenize import tokenize_rendered

    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UserError(format_error(model_dir, "not a model folder (no config.json)",
                                     fix="give the folder `raysft train` exported, e.g. runs/quickstart/final"))
    hf_logging.disable_progress_bar()  # the answer is the output
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids, _ = tokenize_rendered([render_prompt([{"role": "user", "content": prompt}], system_message)], tokenizer)[0]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
