"""Checkpoint -> Hugging Face model folder; and `raysft generate` on such a folder.

The folder holds safetensors weights (ZeRO shards consolidated by DeepSpeed's own `zero_to_fp32`, the fsdp backend's
DCP shards read by DCP's own reader), the model config, the tokenizer with the chat template training used
(`data.chat_template`: raysft's ChatML, which renders exactly as raysft's templating does, or the model's own or a
file's), and a generation config whose eos is that template's end-of-turn token (then the base model's eos ids and
the tokenizer's eos). `raysft.json` records how the model was made and `README.md` is its model card (`card.py`),
with `data.chat_template_kwargs` when the run set them: `raysft generate` renders with them, as training did (pass
them to `apply_chat_template` yourself elsewhere).
"""

from __future__ import annotations

import json
import os
from typing import Callable

from raysft import card
from raysft import checkpoint as ckpt
from raysft.errors import UserError, format_error

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a checkpoint's shards
MAX_STAND_INS = 20  # DeepSpeed pickles a handful of config classes; more means the file is something else


def consolidated_state_dict(model_dir: str, zero_stage: int, trainable_only: bool = False) -> dict:
    """fp32 weights from a DeepSpeed checkpoint folder or the fsdp backend's DCP checkpoint (every rank's files
    present); with `trainable_only` (LoRA) the adapter's weights, which are all such a checkpoint holds."""
    if os.path.exists(os.path.join(model_dir, DCP_METADATA)):
        return dcp_model_state(model_dir)
    with open(os.path.join(model_dir, ckpt.LATEST), encoding="utf-8") as f:
        tag = f.read().strip()
    if zero_stage == 0:
        return {k: v.float() for k, v in _module_weights(os.path.join(model_dir, tag, "mp_rank_00_model_states.pt"))
                .items()}
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from raysft.console import verbose

    if verbose():
        return get_fp32_state_dict_from_zero_checkpoint(model_dir, tag=tag, exclude_frozen_parameters=trainable_only)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # zero_to_fp32 prints a line per shard and parameter group, and a progress bar
        return get_fp32_state_dict_from_zero_checkpoint(model_dir, tag=tag, exclude_frozen_parameters=trainable_only)


def dcp_model_state(model_dir: str) -> dict:
    """The model's full state dict from a DCP checkpoint written by the fsdp backend, read in this one process with
    DCP's public `dcp.load(..., no_dist=True)` into tensors allocated from the checkpoint's own metadata (the
    optimizer's entries are not read)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(model_dir)
    model = {key[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in reader.read_metadata().state_dict_metadata.items()
             if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return {k: v.float() for k, v in model.items()}


def _module_weights(path: str) -> dict:
    """The `module` tensors of DeepSpeed's ZeRO-0 model file, unpickling nothing but tensors and plain containers.

    The file also records DeepSpeed's config objects; `weights_only=True` refuses those, so the loader is given
    stand-ins for exactly the classes named in the refusal (up to MAX_STAND_INS) and nothing else runs.
    """
    import pickle

    import torch

    allowed = []
    for _ in range(MAX_STAND_INS):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as exc:
            import re

            names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
            if not names:
                blocked = re.findall(r"GLOBAL ([\w.]+)", str(exc))
                raise UserError(format_error(path, "refusing to load: the file asks to run "
                                             f"{blocked[0] if blocked else 'code'} when unpickled",
                                             fix="export a checkpoint you wrote; this file was not made by DeepSpeed "
                                             "for raysft")) from None
            module, _, name = names[0].rpartition(".")
            allowed.append((type(name, (_Inert,), {"__module__": module}), names[0]))
    raise RuntimeError(f"{path}: too many non-tensor objects to load safely")


class _Inert:
    """Stands in for a class pickled into a DeepSpeed file: accepts any state, runs no code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def export(checkpoint_path: str, out_dir: str, log: Callable[[str], None] = print, merge: bool = False) -> str:
    """A checkpoint as a Hugging Face folder: the full model, or for a LoRA run the adapter (`merge`: the base
    model with the adapter merged in)."""
    import torch
    import yaml

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed loads (else it warns that it guessed)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from raysft.config import from_dict

    problem = ckpt.verify(checkpoint_path)
    if problem is not None:
        raise UserError(format_error(checkpoint_path, "not a whole checkpoint", fix=f"{problem}; export another one"))
    log(f"export: consolidating {checkpoint_path} into a Hugging Face folder")
    state = ckpt.read_state(checkpoint_path)
    with open(os.path.join(checkpoint_path, ckpt.CONFIG), encoding="utf-8") as f:
        cfg = from_dict(yaml.safe_load(f))
    model_dir = ckpt.model_dir(checkpoint_path)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(checkpoint_path, ckpt.TOKENIZER))
    weights = consolidated_state_dict(model_dir, state.zero_stage, trainable_only=state.lora)
    if state.lora:
        model = _with_adapter(cfg, tokenizer, weights, checkpoint_path)
        if merge:
            model = model.merge_and_unload()
        config = model.config
    else:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{checkpoint_path}: weights do not match the model (missing {missing}, unexpected "
                               f"{unexpected})")
        model.tie_weights()
    config.use_cache = True  # off in training (see modeling.build_model), on for generation
    model.to(getattr(torch, DTYPE_NAMES[cfg.train.dtype]))
    kwargs = cfg.data.chat_template_kwargs
    generation = GenerationConfig(**chat_ready(tokenizer, cfg.data.chat_template, _base_eos(cfg.model.name_or_path),
                                               kwargs), bos_token_id=config.bos_token_id)
    model.generation_config = generation
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    generation.save_pretrained(out_dir)  # an adapter folder has none of its own
    tokenizer.save_pretrained(out_dir)
    card.write(out_dir, card.make_record(cfg, state, checkpoint_path, ("merged" if merge else "adapter")
                                         if state.lora else None), cfg.output_dir)
    kind = ("LoRA merged into the base" if merge else "LoRA adapter") if state.lora else "model"
    log(f"export: {checkpoint_path} -> {out_dir} ({kind}, step {state.step})")
    return out_dir


def _base_eos(model: str) -> list:
    """The base model's own generation eos ids (e.g. Llama 3.1's <|eom_id|>, gpt-oss's <|call|>), if it has any."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except Exception:  # no generation_config.json (or no such folder): nothing to keep
        return []
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def chat_ready(tokenizer, chat_template: str, base_eos=(), template_kwargs=None) -> dict:
    """Give the tokenizer the template training used; returns the generation config's token ids (eos: the template's
    end-of-turn token first, then the base model's generation eos ids, then the tokenizer's eos).

    Under ``chatml`` the template is raysft's (checkpoints made before templates were kept carry the model's own,
    though they were trained on ChatML); otherwise the tokenizer already carries it, from the prepared dataset.
    """
    from raysft.data.chatml import CHAT_TEMPLATE
    from raysft.data.template import stop_ids

    if chat_template == "chatml":
        tokenizer.chat_template = CHAT_TEMPLATE
    return {"eos_token_id": stop_ids(tokenizer, base_eos, template_kwargs), "pad_token_id": tokenizer.pad_token_id}


def _with_adapter(cfg, tokenizer, adapter: dict, checkpoint_path: str):
    """The base model (from model.name_or_path, as the workers built it) with the checkpoint's adapter loaded."""
    from raysft.modeling import apply_lora, build_model, vocab_grows

    base = build_model(cfg.model.name_or_path, len(tokenizer), seed=cfg.train.seed, dtype="fp32",
                       trust_remote_code=cfg.model.trust_remote_code)
    model = apply_lora(base, cfg.train.lora, vocab_grew=vocab_grows(cfg.model.name_or_path, len(tokenizer),
                                                                    cfg.model.trust_remote_code))
    model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path
    missing, unexpected = model.load_state_dict(adapter, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(adapter):
        raise RuntimeError(f"{checkpoint_path}: adapter weights do not match train.lora (missing "
                           f"{sorted(trainable - set(adapter))[:5]}, unexpected {unexpected[:5]})")
    return model


def generate(model_dir: str, prompt: str, max_new_tokens: int = 128, system_message=None) -> str:
    """Render the prompt with the folder's chat template as in training, generate greedily until the end-of-turn
    token, return the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    from raysft.data.template import render_prompt
    from raysft.data.tokenize import tokenize_rendered

    adapter = os.path.exists(os.path.join(model_dir, "adapter_config.json"))
    if not adapter and not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UserError(format_error(model_dir, "not a model folder (no config.json or adapter_config.json)",
                                     fix="give the folder `raysft train` exported, e.g. runs/quickstart/final"))
    hf_logging.disable_progress_bar()  # the answer is the output
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if adapter:  # a LoRA adapter: its base model (from adapter_config.json) with the adapter applied
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    generation = GenerationConfig.from_pretrained(model_dir)
    rendered = render_prompt([{"role": "user", "content": prompt}], tokenizer, system_message,
                             template_kwargs=exported_template_kwargs(model_dir))
    ids, _ = tokenize_rendered([rendered], tokenizer)[0]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, generation_config=generation)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def exported_template_kwargs(model_dir: str) -> dict:
    """The `data.chat_template_kwargs` an export was trained with (raysft.json), {} when none or not raysft's."""
    try:
        with open(os.path.join(model_dir, "raysft.json"), encoding="utf-8") as f:
            kwargs = json.load(f).get("chat_template_kwargs") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return kwargs if isinstance(kwargs, dict) else {}
