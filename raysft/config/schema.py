"""The config tree: typed dataclasses, one line of doc per field, and every default.

Loaded and validated by `raysft.config.load` (file:line in every error), checked across fields by
`raysft.config.checks`. `describe()` lists every key for docs/CONFIG.md (scripts/config_table.py).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from raysft.errors import UserError


def doc(text: str, **kw) -> dict:
    return {"doc": text, **kw}


@dataclass
class DataConfig:
    train_files: list[str] = field(
        default_factory=list,
        metadata=doc("training data: a path, a glob or a URI (s3://, gs://), or a list of them; "
                     ".jsonl, .jsonl.gz, .json (an array, or JSON Lines), .json.gz or .parquet"),
    )
    eval_files: list[str] = field(default_factory=list, metadata=doc("evaluation data, same forms as train_files"))
    eval_fraction: float = field(default=0.0, metadata=doc("share of train_files records held out for evaluation "
                                                           "(chosen by a hash of file name and line: deterministic)"))
    json_field: str = field(default="", metadata=doc(
        "for .json files that hold one object: the key of the records' array in it (as `datasets`' json loader's "
        "field), e.g. data"))
    hf_dataset: str = field(default="",
                            metadata=doc("a Hugging Face dataset: a folder saved by `datasets` or a hub id"))
    hf_split: str = field(default="train", metadata=doc("split of `hf_dataset` to train on"))
    sources: list[dict] = field(default_factory=list, metadata=doc(
        "several datasets mixed by weight, instead of train_files/hf_dataset: a list of {files | hf_dataset (+ "
        "hf_split), weight, name, columns, system_message, eval_fraction, json_field, where, transcript_roles}; "
        "each source's share of the training examples is its weight's share (repeated or sampled at prepare, from "
        "train.seed)"))
    prepared_path: str = field(default="", metadata=doc(
        "where prepared datasets go, a folder per fingerprint; empty = {output_dir}/prepared. Runs that share it "
        "prepare the same data once (local or mounted storage every node sees)"))
    max_seq_len: int = field(default=2048, metadata=doc("tokens per training row"))
    packing: bool = field(default=True, metadata=doc("pack several examples per row (best-fit decreasing); false pads"))
    loss_on: Literal["completion", "all"] = field(
        default="completion", metadata=doc("train on the completion's assistant turns, or on every token")
    )
    system_message: Optional[str] = field(default=None, metadata=doc("system message put first when a record has none"))
    columns: dict = field(default_factory=dict, metadata=doc(
        "the dataset's own names for raysft's record fields, message keys and roles, e.g. {messages: conversation, "
        "role: speaker, content: text, user: human, assistant: bot}"))
    chat_template: str = field(default="auto", metadata=doc(
        "how conversations become text: auto (the tokenizer's own template when it has one, else chatml; resolved "
        "once by prepare, recorded in the manifest and the checkpoint's config), chatml (raysft's, with tools and "
        "reasoning), model (the tokenizer's own Jinja template; its default one when it has several), model:NAME "
        "(the tokenizer's template of that name, e.g. model:tool_use), or the path of a .jinja file"))
    chat_template_kwargs: dict = field(default_factory=dict, metadata=doc(
        "extra variables for every render of a model or file template (prepare, the preflight, the eval prompts, "
        "the export and raysft generate), e.g. {enable_thinking: false} for Qwen3"))
    train_on_reasoning: bool = field(default=True, metadata=doc(
        "train on assistants' reasoning (reasoning_content, <think> blocks); false masks it, the answer stays "
        "trained"))
    transcript_roles: dict = field(default_factory=dict, metadata=doc(
        "read chat transcripts kept in one string (HH-RLHF's \\n\\nHuman: ... \\n\\nAssistant: ...) as turns: "
        "each speaker's name and its role, e.g. {Human: user, Assistant: assistant}; empty = such strings stay "
        "plain text"))
    where: Optional[dict] = field(default=None, metadata=doc(
        "keep only the records whose fields match, after data.columns and before the eval split: {field: value} "
        "(equality) or {field: {op: value}} with ==, !=, in, not in, <, <=, >, >= (numbers); a missing field does "
        "not match; e.g. {label: true}. Records with a KTO-style label need it set ({} keeps them all)"))
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
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2",
                                 "flash_attention_3"] = field(default="auto", metadata=doc(
        "transformers attention; auto = flash_attention_3/2 on CUDA when installed, else sdpa (all exact for packed "
        "rows); the choice is printed at start"))


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
    backend: Literal["deepspeed", "fsdp", "hf"] = field(default="deepspeed", metadata=doc(
        "worker: deepspeed (raysft's own loop on a DeepSpeed engine), fsdp (the same loop on PyTorch's FSDP2, DCP "
        "checkpoints) or hf (TRL's SFTTrainer); same rows, same order"))
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
    offload_activations: bool = field(default=False, metadata=doc(
        "deepspeed backend, with gradient_checkpointing: keep the checkpointed activations (each decoder layer's "
        "saved inputs) in CPU memory until backward"))
    sequence_parallel_size: int = field(default=1, metadata=doc(
        "deepspeed backend: workers per sequence-parallel group (Ulysses, DeepSpeed's ALST); each row is split along "
        "the sequence over the group's workers; must divide cluster.num_workers, the model's attention heads and "
        "data.max_seq_len; 1 = off"))
    tiled_mlp: bool = field(default=False, metadata=doc(
        "deepspeed backend: compute each decoder layer's MLP a slice of the sequence at a time, forward and backward "
        "(DeepSpeed's TiledMLP): less memory for long rows, one more MLP forward"))
    dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata=doc("training precision"))
    zero_stage: int = field(default=2, metadata=doc(
        "DeepSpeed ZeRO stage 0-3; fsdp: 2 keeps each layer's gathered parameters from forward to backward, 3 "
        "reshards them after forward (least memory)"))
    offload_optimizer: bool = field(default=False, metadata=doc(
        "ZeRO: optimizer state in CPU memory (fsdp: with the parameters, GPU only)"))
    offload_params: bool = field(default=False, metadata=doc(
        "ZeRO-3: parameters in CPU memory (fsdp: with the optimizer state, GPU only)"))
    deepspeed_config: dict = field(default_factory=dict,
                                   metadata=doc("your DeepSpeed config, merged over the generated one"))
    log_every_steps: int = field(default=1, metadata=doc("print and report metrics every N steps"))
    eval_every_steps: int = field(default=0, metadata=doc("eval every N steps (and at the end), when there is eval "
                                                          "data or eval_prompts; 0 = only at the end"))
    eval_prompts: list[str] = field(default_factory=list, metadata=doc(
        "prompts the model answers at each eval (greedy, rendered with the run's chat template): console, "
        "samples.jsonl, TensorBoard's text tab"))
    eval_max_new_tokens: int = field(default=64, metadata=doc("longest answer to an eval prompt, in tokens"))
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=doc(
        "where rank 0 logs metrics, eval answers and (mlflow, wandb) the resolved config: any of tensorboard, mlflow "
        "(pip install 'raysft[mlflow]'), wandb (pip install 'raysft[wandb]'); metrics.jsonl is always written"))
    tracking_uri: str = field(default="", metadata=doc(
        "MLflow tracking server, e.g. http://mlflow:5000; empty = the driver's MLFLOW_TRACKING_URI"))
    tracking_project: str = field(default="raysft", metadata=doc(
        "MLflow experiment / W&B project the run goes to (the tracking run is named after run_name)"))
    fused_loss: Literal["chunked", "liger", "none"] = field(default="chunked", metadata=doc(
        "loss from the hidden states: chunked (trained positions only, the head in chunks: no full logits), "
        "liger (liger-kernel, CUDA), none (full fp32 logits)"))
    prefetch_batches: int = field(default=2, metadata=doc(
        "deepspeed and fsdp backends: optimizer steps of micro-batches collated ahead in a background thread; 0 = off"))
    compile: bool = field(default=False, metadata=doc("torch.compile the model (fsdp: each decoder layer)"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    hf_args: dict = field(default_factory=dict, metadata=doc("hf backend: further trl.SFTConfig fields, checked "
                                                             "against SFTConfig"))


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=0, metadata=doc("checkpoint every N steps; 0 = only at the end"))
    keep: int = field(default=2, metadata=doc("newest good checkpoints kept; the last good one is never deleted"))
    storage_path: str = field(default="", metadata=doc("Ray Train storage; empty = {output_dir}/ray"))
    allow_data_change: bool = field(default=False, metadata=doc("resume even if the prepared data changed"))
    allow_schedule_change: bool = field(default=False, metadata=doc(
        "resume even if max_steps, epochs, global_batch_size, lr, lr_scheduler or warmup_steps changed"))


@dataclass
class ClusterConfig:
    address: str = field(default="", metadata=doc("Ray address; empty = start Ray in this process"))
    num_workers: int | list[int] = field(default=2, metadata=doc(
        "Ray Train workers, or [min, max] for Ray Train's elastic mode (deepspeed and fsdp backends)"))
    use_gpu: bool = field(default=False, metadata=doc("one GPU per worker"))
    resources_per_worker: dict = field(default_factory=dict, metadata=doc("e.g. {CPU: 4, GPU: 1}"))
    max_failures: int = field(default=0, metadata=doc("worker-group restarts before giving up"))
    max_preemption_failures: int = field(default=-1, metadata=doc(
        "restarts after a node was preempted (drained for preemption: spot reclaim, KubeRay's SIGTERM) before "
        "giving up, counted apart from max_failures; -1 unlimited, as Ray Train's"))
    num_cpus: int = field(default=0, metadata=doc("logical CPUs of an in-process Ray; 0 = enough for workers and data "
                                                  "tasks"))


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



def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every config key: docs/CONFIG.md's table comes from here."""
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
