import glob
import os

import pytest
import yaml

from raysft.cli import main
from raysft.config import Config, ConfigError, describe, load_config

from helpers import ROOT

GOOD = """\
output_dir: runs/x
data:
  train_files: data/a.jsonl
model:
  name_or_path: Qwen/Qwen2.5-0.5B
"""


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.output_dir and os.path.isabs(cfg.output_dir)


def test_the_shipped_long_row_config_splits_32k_rows_over_groups_a_qwen2_0_5b_shape_allows():
    from transformers import Qwen2Config

    from raysft.train.sequence_parallel import model_problem

    cfg = load_config(os.path.join(ROOT, "configs", "qwen2.5-0.5b-long-sp.yaml"))
    t, sp = cfg.train, cfg.train.sequence_parallel_size
    assert (cfg.data.max_seq_len, sp, t.backend, cfg.cluster.num_workers % sp) == (32768, 2, "deepspeed", 0)
    assert t.tiled_mlp and t.gradient_checkpointing and t.offload_activations
    qwen = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2)  # Qwen2.5-0.5B's heads
    assert model_problem(qwen, sp) is None
    assert model_problem(qwen, 4) == ("the model's 14 attention heads (num_attention_heads) are not divisible by 4",
                                      "use a sequence_parallel_size this model splits into: 2, 14")


def test_the_shipped_mixed_config_weights_two_sources_and_tracks_in_mlflow():
    from raysft.data.mixing import sources_of

    cfg = load_config(os.path.join(ROOT, "configs", "qwen2.5-0.5b-mixed-mlflow.yaml"))
    sources = sources_of(cfg.data)
    assert [(s["name"], s["weight"]) for s in sources] == [("chats", 0.7), ("tools", 0.3)]
    assert all(os.path.isabs(f) for s in sources for f in s["files"]) and sources[1]["columns"]["messages"] == \
        "conversation"
    assert cfg.train.report_to == ["tensorboard", "mlflow"] and cfg.train.tracking_uri.startswith("http://")


def test_defaults_overrides_and_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(GOOD)
    cfg = load_config("c.yaml", ["train.lr=2e-5", "data.packing=false", "data.train_files=[a.jsonl, b.jsonl]",
                                 "cluster.num_workers=4", "train.deepspeed_config={zero_optimization: {stage: 3}}"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.packing is False
    assert cfg.data.train_files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert cfg.train.deepspeed_config == {"zero_optimization": {"stage": 3}}
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"  # a hub id stays a hub id
    assert cfg.run_name == "x"
    assert cfg.checkpoint.storage_path == str(tmp_path / "runs" / "x" / "ray")
    assert cfg.data.loss_on == "completion" and cfg.data.on_bad_record == "error"


def test_all_errors_reported_together_with_file_line_key_value_and_fix(tmp_path):
    (tmp_path / "c.yaml").write_text(GOOD + "trian:\n  lr: 1\ndata_:\n  x: 1\n"
                                     "cluster:\n  num_workers: two\n")
    path = str(tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.loss_on=everything", "data.max_seq_len=abc"])
    assert info.value.problems == [  # in the config's order
        "command line: data.loss_on: must be one of completion, all (got 'everything'). fix: give completion | all "
        "(data.loss_on: train on the completion's assistant turns, or on every token)",
        "command line: data.max_seq_len: must be an integer (got 'abc'). fix: give an integer (data.max_seq_len: tokens per "
        "training row)",
        f"{path}:6: trian: unknown key. fix: did you mean train?",
        f"{path}:8: data_: unknown key. fix: did you mean data?",
        f"{path}:11: cluster.num_workers: must be an integer or a list of integers (got 'two'). fix: give an integer "
        "or a list of integers (cluster.num_workers: Ray Train workers, or [min, max] for Ray Train's elastic mode "
        "(deepspeed and fsdp backends))",
    ]


def test_batch_arithmetic_and_cross_field_errors(tmp_path):
    (tmp_path / "c.yaml").write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "c.yaml"), ["train.global_batch_size=6", "train.micro_batch_size=2",
                                               "cluster.num_workers=2", "train.offload_params=true", "train.lr=0",
                                               "train.hf_args={max_length: 9}", "data.eval_fraction=0.1",
                                               "data.eval_files=x.jsonl", "train.lora.r=8",
                                               "model.from_scratch=true"])
    assert info.value.problems == [
        "command line: train.lr: must be > 0 (got 0.0). fix: use e.g. 2e-5",
        "command line: train.offload_params: needs ZeRO stage 3 (got 2). fix: set train.zero_stage=3 or "
        "offload_params=false",
        "command line: data.eval_fraction: set together with data.eval_files (got 0.1). fix: use one source of eval "
        "data: remove data.eval_files or set data.eval_fraction=0",
        "command line: train.lora.r: LoRA needs pretrained base weights, but model.from_scratch is true (got 8). "
        "fix: set model.from_scratch=false (LoRA adapts a saved model), or train.lora.r=0 for full fine-tuning",
        "command line: train.hf_args: only the hf backend reads it (got 'deepspeed'). fix: set train.backend=hf or "
        "remove train.hf_args",
        "command line: train.global_batch_size: must be a multiple of micro_batch_size x num_workers = 2 x 2 = 4 "
        "(got 6). fix: use 4 or change train.micro_batch_size",
    ]


def test_missing_required_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  max_seq_len: 128\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "c.yaml"))
    assert [p.split(":")[1].strip() for p in info.value.problems] == ["output_dir", "data.train_files",
                                                                      "model.name_or_path"]


def test_bad_yaml_and_bad_override(tmp_path):
    (tmp_path / "c.yaml").write_text("output_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: not valid YAML"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text(GOOD)
    with pytest.raises(ConfigError, match=r"override 'train.lr': expected key=value. fix: write e.g. train.lr=2e-5"):
        load_config(str(tmp_path / "d.yaml"), ["train.lr"])


def test_config_show_prints_resolved_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(GOOD)
    assert main(["config", "show", "c.yaml", "train.seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["seed"] == 7 and shown["data"]["max_seq_len"] == 2048
    assert shown["data"]["train_files"] == [str(tmp_path / "data" / "a.jsonl")]


def test_cli_error_is_one_line_per_problem_and_exit_2(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(GOOD + "trian: {}\n")
    assert main(["config", "show", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raysft: error: {tmp_path / 'c.yaml'}:6: trian: unknown key. fix: did you mean train?"]


def test_every_key_is_documented():
    rows = describe()
    assert all(doc for _, _, doc in rows)
    assert {"output_dir", "data.train_files", "data.eval_files", "data.max_seq_len", "data.packing", "data.loss_on",
            "data.system_message", "data.on_bad_record", "model.name_or_path", "tokenizer.name_or_path",
            "train.backend", "train.seed", "cluster.address", "cluster.num_workers",
            "cluster.use_gpu"} <= {k for k, _, _ in rows}


def test_config_doc_is_the_schema_every_row_whole():
    """docs/CONFIG.md is what `scripts/config_table.py` writes from the schema: every key's row whole (key, default,
    meaning), no other row. After changing a key or its doc: `python scripts/config_table.py`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_table", os.path.join(ROOT, "scripts", "config_table.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(os.path.join(ROOT, "docs", "CONFIG.md"), encoding="utf-8") as f:
        doc = f.read()
    rows = [f"| `{k}` | `{d}` | {m} |" for k, d, m in describe()]
    assert [r for r in rows if r not in doc.splitlines()] == []
    assert [line for line in doc.splitlines() if line.startswith("| `") and line not in rows] == []
    assert doc == script.render()


def test_hf_args_are_checked_against_sftconfig():
    from raysft.train.hf_args import check_hf_args

    check_hf_args({"neftune_noise_alpha": 5.0, "torch_compile_mode": "max-autotune"})  # real SFTConfig fields pass
    with pytest.raises(ConfigError) as info:
        check_hf_args({"neftune_noise_alfa": 5.0, "learning_rate": 1e-4, "max_length": 512, "torch_compile": True})
    assert info.value.problems == [
        "train.hf_args.neftune_noise_alfa: is not a trl.SFTConfig field (got 5.0). fix: did you mean "
        "neftune_noise_alpha?",
        "train.hf_args.learning_rate: is set by raysft from train.lr (got 0.0001). fix: set train.lr instead",
        "train.hf_args.max_length: is set by raysft from data.max_seq_len (got 512). fix: set data.max_seq_len "
        "instead",
        "train.hf_args.torch_compile: is set by raysft from train.compile (got True). fix: set train.compile instead",
    ]


def test_deepspeed_batch_keys_are_raysfts(tmp_path):
    """The batch shape is computed once (schedule.BatchShape): train.deepspeed_config may not set it apart."""
    (tmp_path / "c.yaml").write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "c.yaml"), ["train.deepspeed_config.gradient_accumulation_steps=4",
                                               "train.deepspeed_config.zero_allow_untested_optimizer=true"])
    assert info.value.problems == [
        "command line: train.deepspeed_config.gradient_accumulation_steps: is set by raysft from "
        "train.global_batch_size (accumulation = global / (micro x workers)) (got 4). fix: set "
        "train.global_batch_size (accumulation = global / (micro x workers)) instead"]


@pytest.mark.parametrize("overrides, problem", [
    (["train.fused_loss=liger"], "command line: train.fused_loss: liger-kernel's fused loss runs on CUDA only, and "
     "cluster.use_gpu is false (got 'liger'). fix: use train.fused_loss=chunked (the default) on CPU"),
    (["train.fused_loss=fast"], "command line: train.fused_loss: must be one of chunked, liger, none (got 'fast'). "
     "fix: give chunked | liger | none (train.fused_loss: loss from the hidden states: chunked (trained positions "
     "only, the head in chunks: no full logits), liger (liger-kernel, CUDA), none (full fp32 logits))"),
    (["model.attn_implementation=flex_attention"], "command line: model.attn_implementation: flex_attention trains "
     "on CUDA only (PyTorch's flex_attention has no backward on CPU), and cluster.use_gpu is false (got "
     "'flex_attention'). fix: use model.attn_implementation=auto (sdpa on CPU)"),
    (["train.prefetch_batches=-1"], "command line: train.prefetch_batches: must not be negative (got -1). fix: use 0 "
     "to turn it off, or e.g. 2"),
    (["model.attn_implementation=flash"], "command line: model.attn_implementation: must be one of auto, sdpa, "
     "eager, flex_attention, flash_attention_2, flash_attention_3 (got 'flash'). fix: give auto | sdpa | eager | "
     "flex_attention | flash_attention_2 | flash_attention_3 (model.attn_implementation: transformers attention; "
     "auto = flash_attention_3/2 on CUDA when installed, else sdpa (all exact for packed rows); the choice is printed "
     "at start)"),
])
def test_loss_attention_and_prefetch_settings_are_checked(tmp_path, overrides, problem):
    (tmp_path / "c.yaml").write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "c.yaml"), overrides)
    assert info.value.problems == [problem]
