"""Bad input, in one table: each bad config and each bad data file, run through the CLI as a user would, gets
exactly this one-line error on stderr, exit status 2, and no traceback. Config and model problems are found before
Ray starts; data problems at the record, with its file and line."""

import os

import pytest
import yaml

from raysft.cli import main

from helpers import ROOT

MODEL = os.path.join(ROOT, "examples", "tiny-chatml")
SAMPLE = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")

BAD_CONFIGS = [  # (overrides of a good config, the error)
    (["trian.lr=1"], "command line: trian: unknown key. fix: did you mean train?"),
    (["train.lr=fast"], "command line: train.lr: must be a number (got 'fast'). fix: give a number (train.lr: peak "
                          "learning rate)"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"],
     "command line: train.global_batch_size: must be a multiple of micro_batch_size x num_workers = 4 x 2 = 8 "
     "(got 6). fix: use 8 or change train.micro_batch_size"),
    (["train.zero_stage=5"], "command line: train.zero_stage: must be 0, 1, 2 or 3 (got 5). fix: use 2 (or 3 for "
                              "models that do not fit)"),
    (["train.offload_params=true"], "command line: train.offload_params: needs ZeRO stage 3 (got 2). fix: set "
                                     "train.zero_stage=3 or offload_params=false"),
    (["cluster.num_workers=[3, 1]"], "command line: cluster.num_workers: a range must be [min, max] with 1 <= min "
                                     "<= max (got [3, 1]). fix: write e.g. [2, 4], or one number for a fixed count"),
    (["cluster.num_workers=[1, 2]", "train.backend=hf"],
     "command line: cluster.num_workers: a range (elastic mode) needs train.backend=deepspeed (got [1, 2]). fix: the "
     "hf backend resumes only on the same worker count: give one number, or use the deepspeed backend"),
    (["cluster.num_workers=[2, 4]", "train.global_batch_size=8", "train.micro_batch_size=1"],
     "command line: train.global_batch_size: must be a multiple of micro_batch_size x workers for every worker count "
     "in cluster.num_workers=[2, 4], and is not for [3] (got 8). fix: use 12, or a range whose counts all divide it"),
    (["train.lora.r=8"], "command line: train.lora.r: LoRA needs pretrained base weights, but model.from_scratch is "
                          "true (got 8). fix: set model.from_scratch=false (LoRA adapts a saved model), or "
                          "train.lora.r=0 for full fine-tuning"),
    (["data.eval_fraction=0.7"], "command line: data.eval_fraction: must be at least 0 and below 0.5 (got 0.7). "
                                  "fix: use e.g. 0.05"),
    (["data.eval_fraction=0.1", f"data.eval_files={SAMPLE}"],
     "command line: data.eval_fraction: set together with data.eval_files (got 0.1). fix: use one source of eval "
     "data: remove data.eval_files or set data.eval_fraction=0"),
    (["train.backend=hf", "train.hf_args={learning_rat: 0.1}"],
     "train.hf_args.learning_rat: is not a trl.SFTConfig field (got 0.1). fix: see "
     "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig"),
    (["train.backend=hf", "train.hf_args={learning_rate: 0.1}"],
     "train.hf_args.learning_rate: is set by raysft from train.lr (got 0.1). fix: set train.lr instead"),
    (["model.name_or_path=/nonexistent/model"],
     "model.name_or_path: no such model folder (got '/nonexistent/model'). fix: give a folder with the model's "
     "config.json, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct"),
    (["data.train_files=/nonexistent/*.jsonl"],
     "data.train_files: no file matches (got '/nonexistent/*.jsonl'). fix: check the path or glob (relative paths "
     "are taken from the current directory)"),
]

BAD_DATA = [  # (the JSONL file's text, the error; {file} is its path)
    ('{"messages": [\n', "{file}:1: invalid JSON: Expecting value at column 15; fix: one JSON object per line"),
    ('[1]\n', "{file}:1: a JSON list is not a record (got [1]); fix: one JSON object per line"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n',
     "{file}:1: messages[0]: unknown role 'bot'; fix: use one of system, user, assistant, tool"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n',
     "{file}:1: messages: no assistant message; fix: add the assistant's answer"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     "{file}:1: preference record has 'chosen' but no 'rejected'; fix: add 'rejected', or rename 'chosen' to "
     "'messages'"),
    ('{"prompt": "q", "completion": 5}\n',
     '{file}:1: completion: must be a list of messages (got 5); fix: [{{"role": "user", "content": "..."}}, ...]'),
    ('', "data.train_files: no training rows from 0 records (rejected: none). fix: check the data's format"),
]


def good_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "data": {"train_files": SAMPLE, "max_seq_len": 128},
        "model": {"name_or_path": MODEL, "from_scratch": True},
        "train": {"micro_batch_size": 1, "global_batch_size": 4, "max_steps": 1, "dtype": "fp32"},
        "cluster": {"num_workers": 2}}))
    return str(path)


def run_cli(args, capfd):
    capfd.readouterr()
    code = main(args)
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("raysft: error: ")]
    return code, errors, err


@pytest.mark.parametrize("overrides, expected", BAD_CONFIGS, ids=[" ".join(c[0])[:40] for c in BAD_CONFIGS])
def test_bad_config(tmp_path, capfd, overrides, expected):
    import ray

    code, errors, err = run_cli(["train", good_config(tmp_path), *overrides], capfd)
    assert (code, errors) == (2, [f"raysft: error: {expected}"])
    assert "Traceback" not in err
    assert not ray.is_initialized()  # found before Ray started


@pytest.mark.ray
@pytest.mark.parametrize("text, expected", BAD_DATA, ids=[c[0][:30] or "empty" for c in BAD_DATA])
def test_bad_data(tmp_path, text, expected):
    """`raysft prepare` in its own process (its own Ray): everything it prints on stderr is what a user sees."""
    import subprocess

    data = tmp_path / "train.jsonl"
    data.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(["raysft", "prepare", good_config(tmp_path), f"data.train_files={data}", "cluster.num_cpus=2"],
                       env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("raysft: error: ")]
    assert (r.returncode, errors) == (2, [f"raysft: error: {expected.format(file=data)}"]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
