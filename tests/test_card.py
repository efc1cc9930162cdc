"""The model card and the reproducibility record of an export (issue 44), from the facts a run leaves: the config,
the checkpoint's state, the prepared dataset's manifest, metrics.jsonl and samples.jsonl. The exports of real runs
are pinned in tests/test_train.py (the quickstart) and tests/test_lora.py (a LoRA adapter and its merge)."""

import json
import os
from types import SimpleNamespace

from raysft import card
from raysft.config import load_config
from raysft.data import prepared

SECRET = "s3cr3t-t0ken"


def run_facts(tmp_path, **data):
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(None, [f"output_dir={out}", "data.train_files=data.jsonl", "model.name_or_path=Qwen/Qwen2.5-0.5B",
                             "train.max_steps=3", f"train.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000",
                             "train.report_to=[mlflow]", "data.chat_template=model",
                             "data.chat_template_kwargs={enable_thinking: false}", "train.lora.r=8", "run_name=demo",
                             *[f"data.{k}={v}" for k, v in data.items()]])
    fingerprint = "ab" * 32
    folder = prepared.location(str(out / "prepared"), fingerprint)
    os.makedirs(folder)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"fingerprint": fingerprint, "records_kept": 40, "rows": 7, "trained_tokens": 321,
                   "inputs": {"train": [{"path": f"s3://AKIA:{SECRET}@bucket/data.jsonl", "sha256": "cd" * 32,
                                         "records": 40}]},
                   "sources": [{"name": "data", "weight": 1.0, "records_kept": 40, "examples": 40, "share": 1.0}]}, f)
    with open(out / "metrics.jsonl", "w") as f:
        for step, loss in ((1, 3.5), (2, 2.5), (3, 1.25)):
            f.write(json.dumps({"step": step, "loss": loss, "tokens_seen": 100 * step,
                                **({"eval_loss": 1.5} if step == 3 else {})}) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for step, answer in ((2, "four?"), (3, "4")):
            f.write(json.dumps({"step": step, "prompt": "What is 2 + 2?", "answer": answer}) + "\n")
    state = SimpleNamespace(step=3, fingerprint=fingerprint, world_size=2)
    return cfg, state


def test_the_card_says_what_was_trained_and_how_and_holds_no_secret(tmp_path):
    cfg, state = run_facts(tmp_path)
    record = card.make_record(cfg, state, str(tmp_path / "run" / "checkpoints" / "step_000003"), "adapter")
    text = card.render_card(record, has_plot=True)
    front, body = text.split("\n---\n", 1)
    assert front.splitlines() == ["---", "library_name: peft", 'base_model: "Qwen/Qwen2.5-0.5B"', "tags:",
                                  '- "raysft"', '- "sft"', '- "lora"']
    assert [line for line in body.splitlines() if line.startswith("#")] == [
        "# demo", "## Chat template", "## Training data", "## Training procedure", "## Results",
        "### Eval prompts (answers at step 3)", "## Framework versions", "## Reproduce"]
    assert "This folder holds a LoRA adapter (load it with PEFT over the base model)." in body
    assert "`model`, rendered with `{\"enable_thinking\": false}`" in body
    assert "| `s3://bucket/data.jsonl` | 40 | `cdcdcdcdcdcdcdcd` |" in body  # credentials out of the URI
    assert '| lora | {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]} |' in body
    assert "- final train loss: 1.25\n- final eval loss: 1.5\n- tokens trained on: 300" in body
    assert "**What is 2 + 2?**\n\n> 4\n" in body and "![loss](loss.png)" in body
    assert SECRET not in text and SECRET not in json.dumps(record)  # the tracking URI is never read
    assert record["chat_template_kwargs"] == {"enable_thinking": False}  # what raysft generate reads


def test_a_local_or_from_scratch_base_is_never_the_cards_base_model(tmp_path):
    cfg, state = run_facts(tmp_path)
    cfg.model.name_or_path = str(tmp_path)  # a local folder
    assert "base_model:" not in card.render_card(card.make_record(cfg, state, "ckpt", None))
    cfg.model.name_or_path, cfg.model.from_scratch = "Qwen/Qwen2.5-0.5B", True
    text = card.render_card(card.make_record(cfg, state, "ckpt", "merged"))
    assert "base_model:" not in text and "library_name: transformers" in text
    assert "initialised from the base model's config (trained from scratch)" in text
    assert "the base model with the LoRA adapter merged into its weights" in text
