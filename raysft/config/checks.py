"""Cross-field checks of a loaded config, each problem with its fix (run by `load_config`, before Ray starts)."""

from __future__ import annotations

import difflib
import importlib.util
import math
import os

from raysft import capabilities, storage
from raysft.config.schema import Config, worker_range
from raysft.errors import format_error
from raysft.train.schedule import BatchShape
from raysft.train.tracking import TRACKERS

# apply_chat_template's own arguments and the template's `messages`: not variables a config may set
RENDER_ARGUMENTS = ("messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
                    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")

# attention kernels that cannot train on CPU, and why
CUDA_ATTENTION = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn 3",
                  "flex_attention": "PyTorch's flex_attention has no backward on CPU"}
# DeepSpeed batch keys raysft derives (BatchShape); the schedule and every backend rely on them
DEEPSPEED_OWNED = {"train_batch_size": "train.global_batch_size",
                   "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                   "gradient_accumulation_steps": "train.global_batch_size (accumulation = global / (micro x workers))"}


# what DeepSpeed's Ulysses attention can wrap while keeping a packed row's examples apart (sequence_parallel.py)
ULYSSES_ATTENTION = ("auto", "sdpa", "flash_attention_2", "flash_attention_3")


def installed(module: str) -> bool:
    """Whether `module` can be imported here (an optional extra)."""
    return importlib.util.find_spec(module) is not None


def check(cfg: Config, where, problems: list[str]) -> None:
    """Cross-field checks, each with its fix."""
    def bad(key, what, got, fix):
        problems.append(format_error(where(key), what, got, fix))

    if not cfg.output_dir:
        bad("output_dir", "must be set", None, "add `output_dir: runs/my-run`")
    if not cfg.data.train_files and not cfg.data.hf_dataset and not cfg.data.sources:
        bad("data.train_files", "no training data", None, "set data.train_files to a .jsonl file or data.hf_dataset")
    if not cfg.model.name_or_path:
        bad("model.name_or_path", "must be set", None, "a hub id such as Qwen/Qwen2.5-0.5B or a local model folder")
    from raysft.data.mixing import check_sources
    from raysft.data.records import MESSAGE_FIELDS, RECORD_FIELDS, ROLE_VALUES

    check_sources(cfg.data, bad)
    from raysft.data.where import check_where

    check_where(cfg.data.where, "data.where", bad)
    for key, roles in [("data.transcript_roles", cfg.data.transcript_roles)] + [
            (f"data.sources[{i}].transcript_roles", s.get("transcript_roles")) for i, s in enumerate(cfg.data.sources)
            if s.get("transcript_roles") is not None]:
        if not isinstance(roles, dict):
            bad(key, "must be a mapping of speaker to role", roles, "e.g. {Human: user, Assistant: assistant}")
            continue
        for name, role in roles.items():
            if role not in ROLE_VALUES:
                bad(f"{key}.{name}", "is not a role", role, f"use one of {', '.join(ROLE_VALUES)}")
    for i, s in enumerate(cfg.data.sources):
        check_where(s.get("where"), f"data.sources[{i}].where", bad)
    known = tuple(dict.fromkeys(RECORD_FIELDS + MESSAGE_FIELDS + ROLE_VALUES))
    mappings = [("data.columns", cfg.data.columns)] + [(f"data.sources[{i}].columns", s["columns"])
                                                        for i, s in enumerate(cfg.data.sources)
                                                        if isinstance(s.get("columns"), dict)]
    for prefix, columns in mappings:
        for ours, theirs in columns.items():
            if ours not in known:
                close = difflib.get_close_matches(str(ours), known, n=1)
                bad(f"{prefix}.{ours}", "is not a name raysft reads", ours,
                    (f"did you mean {close[0]}? " if close else "") + f"map one of: {', '.join(known)}")
            elif not isinstance(theirs, str) or not theirs:
                bad(f"{prefix}.{ours}", "must be the dataset's name for it, a string", theirs,
                    f"e.g. {prefix}.{ours}: my_{ours}")
    template = cfg.data.chat_template
    named = template.startswith("model:") and not os.path.isfile(template)
    if named and not template[len("model:"):].strip():
        bad("data.chat_template", "names no template after model:", template,
            "write model:NAME with one of the tokenizer's template names (e.g. model:tool_use), or model")
    elif template not in ("auto", "chatml", "model") and not named and not os.path.isfile(template):
        bad("data.chat_template", "is neither auto, chatml, model, model:NAME nor a file" + (
            " (no such file)" if template.endswith(".jinja") else ""), template,
            "use auto (the tokenizer's own template, else chatml), chatml (raysft's), model (the tokenizer's own "
            "template), model:NAME (one of its named templates) or the path of a .jinja file")
    check_template_kwargs(cfg.data.chat_template_kwargs, template, bad)
    if storage.is_uri(cfg.data.prepared_path):
        bad("data.prepared_path", "must be a folder (local, or storage mounted on every node), not a URI",
            cfg.data.prepared_path, "use a mounted path such as /mnt/shared/prepared, or leave it empty")
    if cfg.data.max_seq_len < 8:
        bad("data.max_seq_len", "must be at least 8", cfg.data.max_seq_len, "use e.g. 2048")
    t = cfg.train
    for key in ("micro_batch_size", "global_batch_size", "epochs", "log_every_steps"):
        if getattr(t, key) < 1:
            bad(f"train.{key}", "must be at least 1", getattr(t, key), "use a positive integer")
    for key in ("max_steps", "warmup_steps"):
        if getattr(t, key) < 0:
            bad(f"train.{key}", "must not be negative", getattr(t, key), "use 0 or a positive integer")
    if t.lr <= 0:
        bad("train.lr", "must be > 0", t.lr, "use e.g. 2e-5")
    if t.weight_decay < 0 or t.max_grad_norm < 0:
        bad("train.weight_decay" if t.weight_decay < 0 else "train.max_grad_norm", "must not be negative",
            min(t.weight_decay, t.max_grad_norm), "use 0 to turn it off")
    if t.zero_stage not in (0, 1, 2, 3):
        bad("train.zero_stage", "must be 0, 1, 2 or 3", t.zero_stage, "use 2 (or 3 for models that do not fit)")
    if t.offload_params and t.zero_stage != 3:
        bad("train.offload_params", "needs ZeRO stage 3", t.zero_stage,
            "set train.zero_stage=3 or offload_params=false")
    if t.offload_optimizer and t.zero_stage == 0:
        bad("train.offload_optimizer", "needs ZeRO stage 1-3", t.zero_stage, "set train.zero_stage=2")
    attn = cfg.model.attn_implementation
    if attn in CUDA_ATTENTION and not cfg.cluster.use_gpu:
        bad("model.attn_implementation", f"{attn} trains on CUDA only ({CUDA_ATTENTION[attn]}), and "
            "cluster.use_gpu is false", attn, "use model.attn_implementation=auto (sdpa on CPU)")
    if t.prefetch_batches < 0:
        bad("train.prefetch_batches", "must not be negative", t.prefetch_batches, "use 0 to turn it off, or e.g. 2")
    if t.fused_loss == "liger" and not cfg.cluster.use_gpu:
        bad("train.fused_loss", "liger-kernel's fused loss runs on CUDA only, and cluster.use_gpu is false",
            t.fused_loss, "use train.fused_loss=chunked (the default) on CPU")
    elif t.fused_loss == "liger" and not installed("liger_kernel"):
        bad("train.fused_loss", "needs liger-kernel, which is not installed", t.fused_loss,
            "pip install 'raysft[liger]', or use train.fused_loss=chunked")
    if t.eval_max_new_tokens < 1:
        bad("train.eval_max_new_tokens", "must be at least 1", t.eval_max_new_tokens, "use e.g. 64")
    if any(not isinstance(p, str) or not p.strip() for p in t.eval_prompts):
        bad("train.eval_prompts", "must be non-empty strings", t.eval_prompts, 'e.g. ["What is 2 + 2?"]')
    for name in t.report_to:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), list(TRACKERS), n=1)
            bad("train.report_to", "names no tracker raysft has", name,
                (f"did you mean {close[0]}? " if close else "") + f"use any of: {', '.join(TRACKERS)}")
        elif TRACKERS[name] and not installed(TRACKERS[name]):
            bad("train.report_to", f"{name} is not installed", name,
                f"pip install 'raysft[{name}]', or remove {name} from train.report_to")
    if t.eval_every_steps < 0:
        bad("train.eval_every_steps", "must not be negative", t.eval_every_steps, "use 0 for only at the end")
    d = cfg.data
    if not 0 <= d.eval_fraction < 0.5:
        bad("data.eval_fraction", "must be at least 0 and below 0.5", d.eval_fraction, "use e.g. 0.05")
    elif d.eval_fraction and d.eval_files:
        bad("data.eval_fraction", "set together with data.eval_files", d.eval_fraction,
            "use one source of eval data: remove data.eval_files or set data.eval_fraction=0")
    lora = t.lora
    if lora.r < 0 or (lora.r and lora.alpha < 1):
        bad("train.lora.r" if lora.r < 0 else "train.lora.alpha", "must be positive", lora.r if lora.r < 0 else
            lora.alpha, "use e.g. train.lora.r=16 train.lora.alpha=32 (r=0 turns LoRA off)")
    if not 0 <= lora.dropout < 1:
        bad("train.lora.dropout", "must be at least 0 and below 1", lora.dropout, "use e.g. 0.05")
    if lora.r and not lora.target_modules:
        bad("train.lora.target_modules", "is empty", lora.target_modules, "use [all-linear] or e.g. [q_proj, v_proj]")
    if lora.r and not capabilities.of(t.backend).lora:
        able = capabilities.having("lora")
        bad("train.lora.r", f"the {t.backend} backend does not train LoRA adapters", lora.r,
            f"set train.backend={able[0]}, or train.lora.r=0" if able else "set train.lora.r=0")
    if lora.r and cfg.model.from_scratch:
        bad("train.lora.r", "LoRA needs pretrained base weights, but model.from_scratch is true", lora.r,
            "set model.from_scratch=false (LoRA adapts a saved model), or train.lora.r=0 for full fine-tuning")
    for key in sorted(set(t.deepspeed_config) & set(DEEPSPEED_OWNED)):
        bad(f"train.deepspeed_config.{key}", f"is set by raysft from {DEEPSPEED_OWNED[key]}", t.deepspeed_config[key],
            f"set {DEEPSPEED_OWNED[key]} instead")
    check_backend(cfg, bad)
    check_long_rows(cfg, bad)
    if t.hf_args and not capabilities.of(t.backend).hf_args:
        readers = capabilities.having("hf_args")
        bad("train.hf_args", f"only {capabilities.names(readers)} {'reads' if len(readers) == 1 else 'read'} it",
            t.backend, f"set train.backend={readers[0]} or remove train.hf_args")
    c = cfg.cluster
    elastic = isinstance(c.num_workers, list)
    if elastic and (len(c.num_workers) != 2 or not 1 <= c.num_workers[0] <= c.num_workers[1]):
        bad("cluster.num_workers", "a range must be [min, max] with 1 <= min <= max", c.num_workers,
            "write e.g. [2, 4], or one number for a fixed count")
    elif elastic and not capabilities.of(t.backend).elastic:
        able = " or ".join(capabilities.having("elastic"))
        bad("cluster.num_workers", f"a range (elastic mode) needs train.backend={able}", c.num_workers,
            f"the {t.backend} backend resumes only on the same worker count: give one number, or use the {able} "
            "backend")
    elif not elastic and c.num_workers < 1:
        bad("cluster.num_workers", "must be at least 1", c.num_workers, "use 1 or more")
    elif t.micro_batch_size >= 1:
        low, high = worker_range(c)
        shapes = [BatchShape(t.global_batch_size, t.micro_batch_size, n) for n in range(low, high + 1)]
        odd = [s.world_size for s in shapes if not s.divides]
        if odd and not elastic:
            per_step = shapes[0].rows_per_pass
            bad("train.global_batch_size", f"must be a multiple of micro_batch_size x num_workers = "
                f"{t.micro_batch_size} x {c.num_workers} = {per_step}", t.global_batch_size,
                f"use {max(per_step, t.global_batch_size // per_step * per_step)} or change train.micro_batch_size")
        elif odd:
            lcm = math.lcm(*(s.rows_per_pass for s in shapes))
            bad("train.global_batch_size", f"must be a multiple of micro_batch_size x workers for every worker count "
                f"in cluster.num_workers={c.num_workers}, and is not for {odd}", t.global_batch_size,
                f"use {-(-t.global_batch_size // lcm) * lcm}, or a range whose counts all divide it")
    for key in ("max_failures", "max_preemption_failures"):
        if getattr(c, key) < -1:
            bad(f"cluster.{key}", "must be -1 (unlimited) or more", getattr(c, key), "use e.g. 2")
    if cfg.checkpoint.keep < 1:
        bad("checkpoint.keep", "must be at least 1", cfg.checkpoint.keep, "use e.g. 2")
    if cfg.checkpoint.every_steps < 0:
        bad("checkpoint.every_steps", "must not be negative", cfg.checkpoint.every_steps, "use 0 for only at the end")


def _or(fix: str, other: str, joint: str) -> str:
    """A backend's own fix, or another backend; 'set ...' when only the other backend is left."""
    return f"{fix}{joint}{other}" if fix and other else fix or (f"set {other}" if other else "change train.backend")


def check_backend(cfg: Config, bad) -> None:
    """What the chosen backend does not do (its capabilities, raysft/capabilities.py), each with the way to get it:
    the backend's own fix, or another backend that has it."""
    t = cfg.train
    caps = capabilities.of(t.backend)

    if t.zero_stage in (0, 1, 2, 3) and t.zero_stage not in caps.zero_stages:  # else refused above
        others = capabilities.with_zero_stage(t.zero_stage)
        why, fix = caps.limits.get("zero_stage", (f"has ZeRO stages {caps.zero_stages} only", ""))
        bad("train.zero_stage", f"the {t.backend} backend {why}", t.zero_stage,
            _or(fix, f"train.backend={others[0]} for ZeRO-{t.zero_stage}" if others else "", "; or "))
    if t.dtype not in caps.dtypes:
        others = capabilities.with_dtype(t.dtype)
        why, fix = caps.limits.get("dtype", (f"does not train in {t.dtype}", ""))
        bad("train.dtype", f"the {t.backend} backend {why}", t.dtype,
            _or(fix, f"train.backend={others[0]} for {t.dtype}" if others else "", ", or "))
    offload = [k for k in ("offload_optimizer", "offload_params") if getattr(t, k)]
    if offload and not cfg.cluster.use_gpu and not caps.offload_on_cpu:
        why, _ = caps.limits.get("offload", ("offloads from a GPU only, and cluster.use_gpu is false", ""))
        others = capabilities.having("offload_on_cpu")
        bad(f"train.{offload[0]}", f"the {t.backend} backend {why}", True,
            f"set train.{offload[0]}=false on CPU" + (f" (or train.backend={others[0]}, whose ZeRO offload runs on "
                                                     "CPU too)" if others else ""))
    if t.deepspeed_config and not caps.deepspeed:
        readers = capabilities.having("deepspeed")
        bad("train.deepspeed_config", f"only {capabilities.names(readers)} {'reads' if len(readers) == 1 else 'read'}"
            " it", ", ".join(map(str, t.deepspeed_config)),
            f"remove train.deepspeed_config, or set train.backend={readers[0]}")


def check_long_rows(cfg: Config, bad) -> None:
    """Sequence parallelism, tiled MLP and activation offload (raysft/train/sequence_parallel.py): deepspeed backend
    only; the head counts are checked against the model's config in launch.preflight."""
    t, sp = cfg.train, cfg.train.sequence_parallel_size
    for key, on in (("sequence_parallel_size", sp != 1), ("tiled_mlp", t.tiled_mlp),
                    ("offload_activations", t.offload_activations)):
        if on and not capabilities.of(t.backend).long_rows:
            able = capabilities.having("long_rows")
            bad(f"train.{key}", f"only {capabilities.names(able)} {'has' if len(able) == 1 else 'have'} it "
                f"(DeepSpeed's ALST pieces), and train.backend is {t.backend}", getattr(t, key),
                f"set train.backend={able[0]}, or remove train.{key}")
    if t.offload_activations and not t.gradient_checkpointing:
        bad("train.offload_activations", "offloads the activations gradient checkpointing keeps, and "
            "train.gradient_checkpointing is false", t.offload_activations, "set train.gradient_checkpointing=true")
    if sp < 1:
        bad("train.sequence_parallel_size", "must be at least 1", sp, "use 1 (off) or the workers per sequence")
    if sp <= 1:
        return
    low, high = worker_range(cfg.cluster)
    odd = [n for n in range(low, high + 1) if n % sp]
    if odd:
        bad("train.sequence_parallel_size", f"must divide cluster.num_workers={cfg.cluster.num_workers} (workers form "
            f"groups of {sp}), and does not divide {odd[0]}", sp,
            f"use num_workers a multiple of {sp}" + (", or a range of one count" if low != high else "")
            + ", or another sequence_parallel_size")
    if cfg.data.max_seq_len % sp:
        bad("data.max_seq_len", f"must be a multiple of train.sequence_parallel_size={sp} (each worker of a group "
            f"takes an equal slice of the row)", cfg.data.max_seq_len,
            f"use {cfg.data.max_seq_len // sp * sp or sp}")
    attn = cfg.model.attn_implementation
    if attn not in ULYSSES_ATTENTION:
        bad("model.attn_implementation", f"{attn} cannot run under sequence parallelism: " + (
            "DeepSpeed's Ulysses refuses eager (a full 4D mask per layer)" if attn == "eager" else
            "DeepSpeed's Ulysses rebuilds flex_attention's mask as plain causal, and the examples of a packed row "
            "would attend to each other"), attn, "use model.attn_implementation=auto, sdpa or a flash_attention kernel")


def check_template_kwargs(kwargs, template: str, bad) -> None:
    """`data.chat_template_kwargs` (a mapping: the schema checked that): template variable names, for a template
    that reads them."""
    key = "data.chat_template_kwargs"
    if kwargs and template == "chatml":
        bad(key, "are variables for the model's or a file's template; raysft's chatml reads none",
            ", ".join(map(str, kwargs)), "set data.chat_template: model (or model:NAME, or a .jinja file), or remove "
            f"{key}")
    for name in kwargs:
        if not isinstance(name, str) or not name.isidentifier():
            bad(f"{key}.{name}", "is not a template variable name", name, "use a name the template reads, e.g. "
                "enable_thinking")
        elif name in RENDER_ARGUMENTS:
            bad(f"{key}.{name}", "is set by raysft on every render, not by the config", name,
                f"remove it from {key}; raysft renders prompts and turns itself")
