"""What an export says about itself: `raysft.json`, the machine-readable record of how the model was made, and the
model card (`README.md`, the Hugging Face model card format) rendered from it -- one source for both.

The record holds the base model (and whether training started from scratch), the chat template as resolved, the
data (each input with its SHA-256, each source's records, examples and share, from the prepared dataset's
manifest), the training keys of the resolved config (backend, ZeRO stage, LoRA, sequence parallelism, batch, the
learning-rate schedule, steps, epochs, tokens), the final train and eval loss, the eval prompts' last answers, and
the versions of raysft and the libraries it trained with. Only those keys are read: no tracking URI, token or
credential is ever copied into either file. `base_model` (front matter) is given only for a hub id the run started
from -- never a local path or a from-scratch model -- and `datasets` only for hub ids. This module imports neither
ray nor torch.
"""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from typing import Optional

from raysft import capabilities

CARD = "README.md"
RECORD = "raysft.json"
LOSS_PLOT = "loss.png"
LIBRARIES = ("raysft", "torch", "transformers", "trl", "deepspeed", "peft", "ray", "datasets")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(name: str) -> Optional[str]:
    """`name` when it reads as a hub id (owner/name) and is no local path, else None.

    >>> hub_id("Qwen/Qwen2.5-0.5B"), hub_id("/models/base"), hub_id("runs/out/final")
    ('Qwen/Qwen2.5-0.5B', None, None)
    """
    return name if name and HUB_ID.match(name) and not os.path.exists(name) else None


def _versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _clean(text: str) -> str:
    """A path or location as the card may show it: credentials in a URI removed."""
    from raysft.train.tracking import USERINFO  # user:password@ in a URI, as the tracking params cut it

    return USERINFO.sub("", text)


def _data(cfg, fingerprint: str) -> dict:
    """The data facts: the prepared dataset's inputs and per-source counts (its manifest), when it is still there."""
    from raysft.data import prepared

    root = cfg.data.prepared_path or os.path.join(cfg.output_dir, "prepared")
    manifest = prepared.read_manifest(prepared.location(root, fingerprint)) or {}
    inputs = [{"path": _clean(i.get("path", "")), "sha256": i.get("sha256", ""), **(
        {"records": i["records"]} if "records" in i else {})} for i in manifest.get("inputs", {}).get("train", [])]
    sources = [{k: s[k] for k in ("name", "weight", "records_read", "records_kept", "examples", "share") if k in s}
               for s in manifest.get("sources", [])]
    hub = [d for d in [cfg.data.hf_dataset] + [s.get("hf_dataset", "") for s in cfg.data.sources]
           if d and hub_id(d)]
    return {"fingerprint": fingerprint, "inputs": inputs, "sources": sources, "hub_datasets": hub,
            **{k: manifest[k] for k in ("records_kept", "rows", "tokens", "trained_tokens") if k in manifest}}


def _training(cfg, state) -> dict:
    t = cfg.train
    out = {"backend": t.backend, "dtype": t.dtype, "workers": state.world_size, "micro_batch_size": t.micro_batch_size,
           "global_batch_size": t.global_batch_size, "lr": t.lr, "lr_scheduler": t.lr_scheduler,
           "warmup_steps": t.warmup_steps, "steps": state.step, "epochs": t.epochs, "max_seq_len": cfg.data.max_seq_len,
           "packing": cfg.data.packing, "loss_on": cfg.data.loss_on, "seed": t.seed,
           "zero_stage": t.zero_stage}  # DeepSpeed's ZeRO stage, or the fsdp backend's resharding
    if t.sequence_parallel_size > 1:
        out["sequence_parallel_size"] = t.sequence_parallel_size
    if t.lora.r:
        out["lora"] = {"r": t.lora.r, "alpha": t.lora.alpha, "dropout": t.lora.dropout,
                       "target_modules": list(t.lora.target_modules)}
    return out


def _results(output_dir: str) -> dict:
    from raysft.train.metrics import SAMPLES_FILE, read_metrics

    metrics = read_metrics(output_dir) if os.path.isdir(output_dir) else []
    out: dict = {}
    if metrics:
        out["train_loss"] = round(float(metrics[-1]["loss"]), 6)
        evals = [m for m in metrics if "eval_loss" in m]
        if evals:
            out["eval_loss"] = round(float(evals[-1]["eval_loss"]), 6)
        out["tokens"] = metrics[-1].get("tokens_seen")
    samples = os.path.join(output_dir, SAMPLES_FILE)
    if os.path.exists(samples):
        with open(samples, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        last = max((r["step"] for r in rows), default=None)
        out["eval_answers"] = [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows if r["step"] == last]
        out["eval_answers_step"] = last
    return {k: v for k, v in out.items() if v is not None}


def make_record(cfg, state, checkpoint_path: str, lora: Optional[str]) -> dict:
    """`raysft.json`: everything the card says, and what `raysft generate` reads (`chat_template_kwargs`).
    `lora`: None (a full model), "adapter" or "merged"."""
    base = cfg.model.name_or_path
    return {
        "checkpoint": _clean(checkpoint_path), "step": state.step, "fingerprint": state.fingerprint,
        **({"chat_template_kwargs": cfg.data.chat_template_kwargs} if cfg.data.chat_template_kwargs else {}),
        "run_name": cfg.run_name, "base_model": _clean(base), "base_model_hub_id": None if cfg.model.from_scratch
        else hub_id(base), "from_scratch": cfg.model.from_scratch, "lora": lora,
        "chat_template": {"name": cfg.data.chat_template, "kwargs": cfg.data.chat_template_kwargs,
                          "system_message": cfg.data.system_message},
        "data": _data(cfg, state.fingerprint), "training": _training(cfg, state), "results": _results(cfg.output_dir),
        "versions": _versions(),
    }


def _yaml_list(key: str, values: list) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values] if values else []


def render_card(record: dict, has_plot: bool = False) -> str:
    """The model card (Hugging Face's format: YAML front matter, then Markdown) of an export's record."""
    lora, base, hub = record["lora"], record["base_model"], record["base_model_hub_id"]
    front = ["---", f"library_name: {'peft' if lora == 'adapter' else 'transformers'}"]
    front += [f"base_model: {json.dumps(hub)}"] if hub else []
    trl = capabilities.of(record["training"]["backend"]).hf_args  # the backend that runs TRL's SFTTrainer
    front += _yaml_list("tags", ["raysft", "sft"] + (["trl"] if trl else []) + (["lora"] if lora else []))
    front += _yaml_list("datasets", record["data"]["hub_datasets"])
    front += ["---", ""]
    what = {None: "the full model's weights", "adapter": "a LoRA adapter (load it with PEFT over the base model)",
            "merged": "the base model with the LoRA adapter merged into its weights"}[lora]
    started = "initialised from the base model's config (trained from scratch)" if record["from_scratch"] else (
        f"fine-tuned from [{hub}](https://huggingface.co/{hub})" if hub else f"fine-tuned from `{base}`")
    lines = [f"# {record['run_name'] or 'raysft model'}", "",
             f"Supervised fine-tuning (SFT) with raysft on Ray: {started}. This folder "
             f"holds {what}.", ""]
    t = record["chat_template"]
    lines += ["## Chat template", "", f"`{t['name']}`" + (f", rendered with `{json.dumps(t['kwargs'])}` (pass them to "
                                                         "`apply_chat_template`)" if t["kwargs"] else "")
              + (f"; default system message: {json.dumps(t['system_message'])}" if t["system_message"] else "")
              + ". The tokenizer in this folder carries it.", ""]
    d = record["data"]
    lines += ["## Training data", "", f"Prepared dataset fingerprint `{d['fingerprint'][:16]}`"
              + "".join(f", {d[k]:,} {k.replace('_', ' ')}" for k in ("records_kept", "rows", "trained_tokens")
                        if k in d) + ".", ""]
    if d["inputs"]:
        lines += ["| input | records | sha256 |", "|---|---|---|"]
        lines += [f"| `{i['path']}` | {i.get('records', '')} | `{i['sha256'][:16]}` |" for i in d["inputs"]]
        lines.append("")
    if len(d["sources"]) > 1:
        lines += ["| source | weight | records kept | examples | share |", "|---|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['weight']} | {s.get('records_kept', '')} | {s.get('examples', '')} | "
                  f"{s.get('share', '')} |" for s in d["sources"]]
        lines.append("")
    lines += ["## Training procedure", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in record["training"].items()]
    lines.append("")
    r = record["results"]
    if r:
        lines += ["## Results", ""]
        lines += [f"- final train loss: {r['train_loss']}"] if "train_loss" in r else []
        lines += [f"- final eval loss: {r['eval_loss']}"] if "eval_loss" in r else []
        lines += [f"- tokens trained on: {r['tokens']:,}"] if "tokens" in r else []
        lines += ["", f"![loss]({LOSS_PLOT})"] if has_plot else []
        lines.append("")
        if r.get("eval_answers"):
            lines += [f"### Eval prompts (answers at step {r['eval_answers_step']})", ""]
            for a in r["eval_answers"]:
                lines += [f"**{a['prompt']}**", "", "> " + a["answer"].replace("\n", "\n> "), ""]
    lines += ["## Framework versions", ""] + [f"- {k}: {v}" for k, v in record["versions"].items()] + [""]
    lines += ["## Reproduce", "", f"The resolved config is the checkpoint's (`{record['checkpoint']}`, step "
              f"{record['step']}); `raysft.json` in this folder holds every fact above as JSON.", ""]
    return "\n".join(front + lines)


def write(out_dir: str, record: dict, output_dir: str) -> None:
    """`raysft.json` and `README.md` into the exported folder (the loss plot beside them, when the run has one)."""
    import shutil

    plot = os.path.join(output_dir, LOSS_PLOT)
    has_plot = os.path.exists(plot)
    if has_plot:
        shutil.copyfile(plot, os.path.join(out_dir, LOSS_PLOT))
    with open(os.path.join(out_dir, RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, CARD), "w", encoding="utf-8") as f:
        f.write(render_card(record, has_plot))
