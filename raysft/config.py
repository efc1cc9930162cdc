"""The one typed config tree: YAML file + dotted `key=value` overrides, strictly validated.

This module owns every default. A config is loaded with `load_config(path, overrides)`; every problem
(unknown key, wrong type, bad value, inconsistent batch sizes) is collected and raised together as one
`ConfigError`, each line saying where (file:line and dotted key), what, the value, and the fix, before
Ray starts. Relative local paths are made absolute against the current directory, because Ray Train
workers run in another working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from raysft.errors import UserError, format_error


def doc(text: str, **kw) -> dict:
    return {"doc": text, **kw}


@dataclass
class DataConfig:
    train_files: list[str] = field(
        default_factory=list,
        metadata=doc("training data: a path, a glob or a URI (s3://, gs://), or a list of them; "
                     ".jsonl, .jsonl.gz or .parquet"),
    )
    eval_files: list[str] = field(default_factory=list, metadata=doc("evaluation data, same forms as train_files"))
    eval_fraction: float = field(default=0.0, metadata=doc("share of train_files records held out for evaluation "
                                                           "(chosen by a hash of file name and line: deterministic)"))
    hf_dataset: str = field(default="", metadata=doc("a Hugging Face dataset: a folder saved by `datasets` or a hub id"))
    hf_split: str = field(default="train", metadata=doc("split of `hf_dataset` to train on"))
    max_seq_len: int = field(default=2048, metadata=doc("tokens per training row"))
    packing: bool = field(default=True, metadata=doc("pack several examples per row (best-fit decreasing); false pads"))
    loss_on: Literal["completion", "all"] = field(
        default="completion", metadata=doc("train on the completion's assistant turns, or on every token")
    )
    system_message: Optional[str] = field(default=None, metadata=doc("system message put first when a record has none"))
    on_bad_record: Literal["error", "skip"] = field(
        default="error", metadata=doc("stop at the first bad record, or skip it (counted, written to rejects)")
    )
    on_overlong: Literal["truncate", "drop"] = field(
        default="truncate", metadata=doc("what to do with an example longer than max_seq_len (counted either way)")
    )


@dataclass
class ModelConfig:
    name_or_path: str = field(default="", metadata=doc("hub id or local folder of a causal LM"))
    from_scratch: bool = field(default=False, metadata=doc("initialise weights randomly from the model's config"))
    trust_remote_code: bool = field(default=False, metadata=doc("allow the model folder's own Python code to run"))
    attn_implementation: str = field(default="sdpa", metadata=doc("transformers attention: sdpa, eager, flash_attention_2"))


@dataclass
class TokenizerConfig:
    name_or_path: str = field(default="", metadata=doc("hub id or local folder; empty = the model's"))


@dataclass
class LoraConfig:
    r: int = field(default=0, metadata=doc("LoRA rank; 0 = full fine-tuning"))
    alpha: int = field(default=16, metadata=doc("LoRA scaling numerator (scale = alpha / r)"))
    dropout: float = field(default=0.0, metadata=doc("dropout on the LoRA input"))
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                      metadata=doc("module names to adapt, or all-linear (every linear layer but the "
                                                   "output head)"))


@dataclass
class TrainConfig:
    backend: Literal["deepspeed", "hf"] = field(default="deepspeed", metadata=doc(
        "worker: deepspeed (raysft's own loop on a DeepSpeed engine) or hf (TRL's SFTTrainer); same rows, same order"))
    seed: int = field(default=42, metadata=doc("seed for weights, data order and dropout"))
    micro_batch_size: int = field(default=1, metadata=doc("rows per forward pass on one worker"))
    global_batch_size: int = field(default=8, metadata=doc("rows per optimizer step over all workers"))
    epochs: int = field(default=1, metadata=doc("passes over the data (when max_steps is 0)"))
    max_steps: int = field(default=0, metadata=doc("optimizer steps; 0 = derived from epochs"))
    lr: float = field(default=2e-5, metadata=doc("peak learning rate"))
    lr_scheduler: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata=doc("decay after warmup"))
    warmup_steps: int = field(default=0, metadata=doc("linear warmup steps"))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=doc("gradient clipping; 0 = off"))
    gradient_checkpointing: bool = field(default=False, metadata=doc("recompute activations in backward"))
    dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata=doc("training precision"))
    zero_stage: int = field(default=2, metadata=doc("DeepSpeed ZeRO stage 0-3"))
    offload_optimizer: bool = field(default=False, metadata=doc("ZeRO: optimizer state in CPU memory"))
    offload_params: bool = field(default=False, metadata=doc("ZeRO-3: parameters in CPU memory"))
    deepspeed_config: dict = field(default_factory=dict, metadata=doc("your DeepSpeed config, merged over the generated one"))
    log_every_steps: int = field(default=1, metadata=doc("print and report metrics every N steps"))
    eval_every_steps: int = field(default=0, metadata=doc("eval loss every N steps (and at the end, when there is "
                                                          "eval data); 0 = only at the end"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    hf_args: dict = field(default_factory=dict, metadata=doc("hf backend: further trl.SFTConfig fields, checked "
                                                             "against SFTConfig"))


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=0, metadata=doc("checkpoint every N steps; 0 = only at the end"))
    keep: int = field(default=2, metadata=doc("newest good checkpoints kept; the last good one is never deleted"))
    storage_path: str = field(default="", metadata=doc("Ray Train storage; empty = {output_dir}/ray"))
    allow_data_change: bool = field(default=False, metadata=doc("resume even if the prepared data changed"))


@dataclass
class ClusterConfig:
    address: str = field(default="", metadata=doc("Ray address; empty = start Ray in this process"))
    num_workers: int | list[int] = field(default=2, metadata=doc(
        "Ray Train workers, or [min, max] for Ray Train's elastic mode (deepspeed backend)"))
    use_gpu: bool = field(default=False, metadata=doc("one GPU per worker"))
    resources_per_worker: dict = field(default_factory=dict, metadata=doc("e.g. {CPU: 4, GPU: 1}"))
    max_failures: int = field(default=0, metadata=doc("worker-group restarts before giving up"))
    num_cpus: int = field(default=0, metadata=doc("logical CPUs of an in-process Ray; 0 = enough for workers and data tasks"))


def worker_range(cluster: ClusterConfig) -> tuple[int, int]:
    """(min, max) Train workers: equal for a fixed count."""
    n = cluster.num_workers
    return (n, n) if isinstance(n, int) else (n[0], n[1])


@dataclass
class Config:
    output_dir: str = field(default="", metadata=doc("where prepared data, checkpoints and the final model go"))
    run_name: str = field(default="", metadata=doc("stable Ray Train run name; empty = output_dir's last folder"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


class ConfigError(UserError):
    """All the problems of one config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# ---------------------------------------------------------------- loading


def _line_map(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError([format_error(f"override {item!r}", "expected key=value", fix="write e.g. train.lr=2e-5")])
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any) -> Any:
    """Value converted to `tp`, or ValueError with what was expected."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) not in typing.get_args(tp):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except ValueError:
                pass
        raise ValueError(f"must be {' or '.join(_type_name(a) for a in typing.get_args(tp))}")
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"must be set ({_type_name(tp)})")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("must be a string")
    if origin is list and typing.get_args(tp) == (int,):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ValueError("must be a list of integers")
    if origin is list:
        if isinstance(value, str):  # a single path is a list of one
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError("must be a string or a list of strings")
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError("must be a mapping")
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp) -> str:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    if tp in simple:
        return simple[tp]
    if typing.get_origin(tp) is list:
        return f"a list of {'integers' if typing.get_args(tp) == (int,) else 'strings'}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _build(cls, raw: Any, prefix: str, where, problems: list[str]):
    """Dataclass `cls` from the mapping `raw`, appending every problem to `problems`."""
    if not isinstance(raw, dict):
        problems.append(format_error(where(prefix.rstrip(".")), "must be a mapping", raw,
                                     f"write `{prefix.rstrip('.')}:` followed by indented keys"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(fields)}"
            problems.append(format_error(where(dotted), "unknown key", fix=fix))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted + ".", where, problems)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError as exc:
            problems.append(format_error(where(dotted), str(exc), value,
                                         f"give {_type_name(tp)} ({dotted}: {fields[key].metadata.get('doc', '')})"))
    return cls(**kwargs)


def _is_uri(path: str) -> bool:
    return "://" in path


def _abs(path: str) -> str:
    return path if (not path or _is_uri(path)) else os.path.abspath(os.path.expanduser(path))


def _check(cfg: Config, where, problems: list[str]) -> None:
    """Cross-field checks, each with its fix."""
    def bad(key, what, got, fix):
        problems.append(format_error(where(key), what, got, fix))

    if not cfg.output_dir:
        bad("output_dir", "must be set", None, "add `output_dir: runs/my-run`")
    if not cfg.data.train_files and not cfg.data.hf_dataset:
        bad("data.train_files", "no training data", None, "set data.train_files to a .jsonl file or data.hf_dataset")
    if not cfg.model.name_or_path:
        bad("model.name_or_path", "must be set", None, "a hub id such as Qwen/Qwen2.5-0.5B or a local model folder")
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
        bad("train.offload_params", "needs ZeRO stage 3", t.zero_stage, "set train.zero_stage=3 or offload_params=false")
    if t.offload_optimizer and t.zero_stage == 0:
        bad("train.offload_optimizer", "needs ZeRO stage 1-3", t.zero_stage, "set train.zero_stage=2")
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
    if lora.r and cfg.model.from_scratch:
        bad("train.lora.r", "LoRA needs pretrained base weights, but model.from_scratch is true", lora.r,
            "set model.from_scratch=false (LoRA adapts a saved model), or train.lora.r=0 for full fine-tuning")
    if t.hf_args and t.backend != "hf":
        bad("train.hf_args", "only the hf backend reads it", t.backend, "set train.backend=hf or remove train.hf_args")
    c = cfg.cluster
    elastic = isinstance(c.num_workers, list)
    if elastic and (len(c.num_workers) != 2 or not 1 <= c.num_workers[0] <= c.num_workers[1]):
        bad("cluster.num_workers", "a range must be [min, max] with 1 <= min <= max", c.num_workers,
            "write e.g. [2, 4], or one number for a fixed count")
    elif elastic and t.backend == "hf":
        bad("cluster.num_workers", "a range (elastic mode) needs train.backend=deepspeed", c.num_workers,
            "the hf backend resumes only on the same worker count: give one number, or use the deepspeed backend")
    elif not elastic and c.num_workers < 1:
        bad("cluster.num_workers", "must be at least 1", c.num_workers, "use 1 or more")
    elif t.micro_batch_size >= 1:
        low, high = worker_range(c)
        odd = [n for n in range(low, high + 1) if t.global_batch_size % (t.micro_batch_size * n)]
        if odd and not elastic:
            per_step = t.micro_batch_size * c.num_workers
            bad("train.global_batch_size", f"must be a multiple of micro_batch_size x num_workers = "
                f"{t.micro_batch_size} x {c.num_workers} = {per_step}", t.global_batch_size,
                f"use {max(per_step, t.global_batch_size // per_step * per_step)} or change train.micro_batch_size")
        elif odd:
            import math

            lcm = math.lcm(*(t.micro_batch_size * n for n in range(low, high + 1)))
            bad("train.global_batch_size", f"must be a multiple of micro_batch_size x workers for every worker count "
                f"in cluster.num_workers={c.num_workers}, and is not for {odd}", t.global_batch_size,
                f"use {-(-t.global_batch_size // lcm) * lcm}, or a range whose counts all divide it")
    if c.max_failures < -1:
        bad("cluster.max_failures", "must be -1 (unlimited) or more", c.max_failures, "use e.g. 2")
    if cfg.checkpoint.keep < 1:
        bad("checkpoint.keep", "must be at least 1", cfg.checkpoint.keep, "use e.g. 2")
    if cfg.checkpoint.every_steps < 0:
        bad("checkpoint.every_steps", "must not be negative", cfg.checkpoint.every_steps, "use 0 for only at the end")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Config from a YAML file (or none) and `key=value` overrides; raises ConfigError listing every problem."""
    raw: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError([format_error(path, "cannot read config", fix=f"check the path ({exc.strerror})")])
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            loc = f"{path}:{mark.line + 1}" if mark else path
            raise ConfigError([format_error(loc, "not valid YAML", fix=str(getattr(exc, "problem", exc)))])
        if not isinstance(raw, dict):
            raise ConfigError([format_error(path, "must be a YAML mapping of keys", type(raw).__name__,
                                            "start with e.g. `output_dir: runs/x`")])
        lines = _line_map(text)
    override_keys = set()
    problems: list[str] = []
    for item in overrides or []:
        try:
            key, value = _parse_override(item)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        _set_dotted(raw, key, value)
        override_keys.add(key)

    def where(key: str) -> str:
        if key in override_keys or any(k.startswith(key + ".") for k in override_keys):
            return f"command line: {key}"
        if key in lines:
            return f"{path}:{lines[key]}: {key}"
        return f"{path}: {key}" if path else key

    cfg = _build(Config, raw, "", where, problems)
    if not problems:
        _check(cfg, where, problems)
    if problems:
        raise ConfigError(problems)
    cfg.output_dir = _abs(cfg.output_dir)
    cfg.data.train_files = [_abs(p) for p in cfg.data.train_files]
    cfg.data.eval_files = [_abs(p) for p in cfg.data.eval_files]
    for sub in (cfg.model, cfg.tokenizer):
        if sub.name_or_path and (sub.name_or_path.startswith((".", "/", "~")) or os.path.exists(sub.name_or_path)):
            sub.name_or_path = _abs(sub.name_or_path)
    if cfg.data.hf_dataset and os.path.exists(cfg.data.hf_dataset):
        cfg.data.hf_dataset = _abs(cfg.data.hf_dataset)
    cfg.checkpoint.storage_path = _abs(cfg.checkpoint.storage_path) or os.path.join(cfg.output_dir, "ray")
    cfg.run_name = cfg.run_name or os.path.basename(cfg.output_dir.rstrip("/")) or "raysft"
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every config key: the README's table comes from here."""
    rows = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("doc", "")))

    walk(Config, "")
    return rows


def from_dict(raw: dict) -> Config:
    """A resolved config back from `to_dict` (in Ray workers, and from a checkpoint's config.yaml)."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", lambda key: key, problems)
    if problems:
        raise ConfigError(problems)
    return cfg
