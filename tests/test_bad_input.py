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

BAD_CONFIGS = [  # (overrides of a good config, the errors, in order)
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
     "command line: cluster.num_workers: a range (elastic mode) needs train.backend=deepspeed or fsdp (got [1, 2]). "
     "fix: the hf backend resumes only on the same worker count: give one number, or use the deepspeed or fsdp "
     "backend"),
    (["train.backend=fsdp", "train.zero_stage=1"],
     "command line: train.zero_stage: the fsdp backend always shards parameters, gradients and optimizer state; it "
     "has stages 2 and 3 only (got 1). fix: set train.zero_stage=2 (each layer's parameters kept gathered from "
     "forward to backward) or 3 (resharded after forward: least memory); or train.backend=deepspeed for ZeRO-1"),
    (["train.backend=fsdp", "train.dtype=fp16"],
     "command line: train.dtype: the fsdp backend trains in bf16 (fp32 master weights) or fp32; fp16 needs loss "
     "scaling it does not do (got 'fp16'). fix: set train.dtype=bf16, or train.backend=deepspeed for fp16"),
    (["train.backend=fsdp", "train.offload_optimizer=true"],
     "command line: train.offload_optimizer: the fsdp backend offloads from a GPU (FSDP2's CPUOffloadPolicy), and "
     "cluster.use_gpu is false: on CPU everything is in CPU memory already (got True). fix: set "
     "train.offload_optimizer=false on CPU (or train.backend=deepspeed, whose ZeRO offload runs on CPU too)"),
    (["train.backend=fsdp", "train.deepspeed_config={gradient_clipping: 0.5}"],
     "command line: train.deepspeed_config: only the deepspeed and hf backends read it (got 'gradient_clipping'). "
     "fix: "
     "remove train.deepspeed_config, or set train.backend=deepspeed"),
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
    (["cluster.num_workers=64", "train.global_batch_size=64"],
     f"cluster.num_workers: 64 workers x 1 CPU = 64 CPUs, but this machine has {os.cpu_count()} and Ray runs in this "
     f"process (cluster.address is empty) (got 64). fix: use at most {os.cpu_count()} workers here, or join a cluster "
     "with enough CPUs (cluster.address, or RAY_ADDRESS)"),
    (["cluster.num_workers=2", "cluster.resources_per_worker={CPU: 8}"],
     f"cluster.num_workers: 2 workers x 8 CPU = 16 CPUs, but this machine has {os.cpu_count()} and Ray runs in this "
     f"process (cluster.address is empty) (got 2). fix: use at most {os.cpu_count() // 8} workers here, or join a "
     "cluster with enough CPUs (cluster.address, or RAY_ADDRESS)"),
    (["data.chat_template=model"],
     f"data.chat_template: the tokenizer has no chat template (got '{MODEL}'). fix: use a tokenizer whose "
     "tokenizer_config.json (or chat_template.jinja) has one, give a .jinja file as data.chat_template, or use "
     "data.chat_template: chatml"),
    (["data.chat_template=/nonexistent/llama.jinja"],
     "command line: data.chat_template: is neither auto, chatml, model, model:NAME nor a file (no such file) (got "
     "'/nonexistent/llama.jinja'). fix: use auto (the tokenizer's own template, else chatml), chatml (raysft's), model "
     "(the tokenizer's own template), model:NAME (one of its named templates) or the path of a .jinja file"),
    (["data.chat_template=model:tool_use"],
     f"data.chat_template: the tokenizer has no chat template (got '{MODEL}'). fix: use a tokenizer whose "
     "tokenizer_config.json (or chat_template.jinja) has one, give a .jinja file as data.chat_template, or use "
     "data.chat_template: chatml"),
    (["data.chat_template='model:'"],
     "command line: data.chat_template: names no template after model: (got 'model:'). fix: write model:NAME with "
     "one of the tokenizer's template names (e.g. model:tool_use), or model"),
    (["data.chat_template=chatml", "data.chat_template_kwargs={enable_thinking: false}"],
     "command line: data.chat_template_kwargs: are variables for the model's or a file's template; raysft's chatml "
     "reads none (got 'enable_thinking'). fix: set data.chat_template: model (or model:NAME, or a .jinja file), or "
     "remove data.chat_template_kwargs"),
    (["data.chat_template_kwargs={enable_thinking: false}"],  # auto, and the tokenizer has no template of its own
     "data.chat_template_kwargs: are variables for the model's own template, and data.chat_template: auto chose "
     "chatml (the tokenizer has no chat template) (got 'enable_thinking'). fix: give the template "
     "(data.chat_template: PATH.jinja), or remove them"),
    (["data.chat_template=model", "data.chat_template_kwargs={add_generation_prompt: true}"],
     "command line: data.chat_template_kwargs.add_generation_prompt: is set by raysft on every render, not by the "
     "config (got 'add_generation_prompt'). fix: remove it from data.chat_template_kwargs; raysft renders prompts and "
     "turns itself"),
    (["data.chat_template=model", "data.chat_template_kwargs=[enable_thinking]"],
     "command line: data.chat_template_kwargs: must be a mapping (got ['enable_thinking']). fix: give a mapping "
     "(data.chat_template_kwargs: extra variables for every render of a model or file template (prepare, the "
     "preflight, the eval prompts, the export and raysft generate), e.g. {enable_thinking: false} for Qwen3)"),
    (["data.columns={mesages: conversation}"],
     "command line: data.columns.mesages: is not a name raysft reads (got 'mesages'). fix: did you mean messages? map "
     "one of: messages, conversations, chosen, rejected, prompt, completion, text, instruction, input, output, "
     "system, tools, chat_template_kwargs, role, content, tool_calls, reasoning_content, tool_call_id, name, user, "
     "assistant, tool"),
    (["data.train_files=[]", f"data.sources=[{{files: {SAMPLE}, wieght: 2}}]"],
     "command line: data.sources[0].wieght: is not a source key (got 'wieght'). fix: did you mean weight? use: name, "
     "files, hf_dataset, hf_split, weight, columns, system_message, eval_fraction, json_field, where, "
     "transcript_roles"),
    ([f"data.sources=[{{files: {SAMPLE}}}]"],
     "command line: data.sources: set together with data.train_files or data.hf_dataset (got 1). fix: give the "
     "training data one way: as data.sources, or data.train_files (one source)"),
    (["data.train_files=[]", f"data.sources=[{{files: {SAMPLE}, weight: 0}}]"],
     "command line: data.sources[0].weight: must be a number above 0 (got 0). fix: e.g. weight: 0.3 (weights need "
     "not sum to 1)"),
    (["data.train_files=[]", f"data.sources=[{{files: {SAMPLE}}}, {{files: /nonexistent/b.jsonl}}]"],
     "data.sources[1].files: no file matches (got '/nonexistent/b.jsonl'). fix: check the path or glob (relative "
     "paths are taken from the current directory)"),
    (["train.report_to=[tensorboard, mlfow]"],
     "command line: train.report_to: names no tracker raysft has (got 'mlfow'). fix: did you mean mlflow? use any of: "
     "tensorboard, mlflow, wandb"),
    (["train.report_to=[mlflow]", "train.tracking_uri=http://127.0.0.1:9"],
     "train.tracking_uri: the MLflow tracking server does not answer ([Errno 111] Connection refused) (got "
     "'http://127.0.0.1:9'). fix: start it (`mlflow server --host 0.0.0.0 --port 5000`) or fix the address; the "
     "workers must reach it too"),
    (["train.sequence_parallel_size=3", "cluster.num_workers=3", "train.global_batch_size=3", "data.max_seq_len=129"],
     f"train.sequence_parallel_size: the model's 4 attention heads (num_attention_heads) are not divisible by 3 "
     f"({MODEL}) (got 3). fix: use a sequence_parallel_size this model splits into: 2, 4"),
    (["train.sequence_parallel_size=2", "data.max_seq_len=127"],
     "command line: data.max_seq_len: must be a multiple of train.sequence_parallel_size=2 (each worker of a group "
     "takes an equal slice of the row) (got 127). fix: use 126"),
    (["train.sequence_parallel_size=4"],
     "command line: train.sequence_parallel_size: must divide cluster.num_workers=2 (workers form groups of 4), and "
     "does not divide 2 (got 4). fix: use num_workers a multiple of 4, or another sequence_parallel_size"),
    (["train.sequence_parallel_size=2", "model.attn_implementation=eager"],
     "command line: model.attn_implementation: eager cannot run under sequence parallelism: DeepSpeed's Ulysses "
     "refuses eager (a full 4D mask per layer) (got 'eager'). fix: use model.attn_implementation=auto, sdpa or a "
     "flash_attention kernel"),
    (["train.sequence_parallel_size=2", "model.attn_implementation=flex_attention"],  # two problems, both told
     "command line: model.attn_implementation: flex_attention trains on CUDA only (PyTorch's flex_attention has no "
     "backward on CPU), and cluster.use_gpu is false (got 'flex_attention'). fix: use model.attn_implementation=auto "
     "(sdpa on CPU)",
     "command line: model.attn_implementation: flex_attention cannot run under sequence parallelism: DeepSpeed's "
     "Ulysses rebuilds flex_attention's mask as plain causal, and the examples of a packed row would attend to each "
     "other (got 'flex_attention'). fix: use model.attn_implementation=auto, sdpa or a flash_attention kernel"),
    (["train.sequence_parallel_size=2", "train.backend=hf"],
     "command line: train.sequence_parallel_size: only the deepspeed backend has it (DeepSpeed's ALST pieces), and "
     "train.backend is hf (got 2). fix: set train.backend=deepspeed, or remove train.sequence_parallel_size"),
    (["train.offload_activations=true"],
     "command line: train.offload_activations: offloads the activations gradient checkpointing keeps, and "
     "train.gradient_checkpointing is false (got True). fix: set train.gradient_checkpointing=true"),
    (['data.where={score: {">=": high}, source: {within: [a]}}'],
     "command line: data.where.score.>=: compares numbers (got 'high'). fix: e.g. {\">=\": 4}",
     "command line: data.where.source.within: is not an operator (got 'within'). fix: use one of ==, !=, in, not in, "
     "<, <=, >, >="),
    (["data.transcript_roles={Human: human, Assistant: assistant}"],
     "command line: data.transcript_roles.Human: is not a role (got 'human'). fix: use one of system, user, "
     "assistant, tool"),
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
    ('{"text": "ok"}\n{"messages": ' + "[" * 10000 + "]" * 10000 + '}\n',
     "{file}:2: nested too deeply for a JSON parser (more than ~1,000 levels of [ or {{); fix: flatten the record"),
]

DEEP = '{"a": ' + "[" * 10000 + "]" * 10000 + "}"


def good_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "data": {"train_files": SAMPLE, "max_seq_len": 128},
        "model": {"name_or_path": MODEL, "from_scratch": True},
        "train": {"micro_batch_size": 1, "global_batch_size": 4, "max_steps": 1, "dtype": "fp32"},
        "cluster": {"num_workers": 2}}))
    return str(path)


@pytest.fixture
def ray_calls(monkeypatch):
    """Each time raysft asked to start or join Ray (`ray.init`), which these tests refuse, with raysft seeing no Ray
    running (`ray.is_initialized`) whatever ran earlier in the session: their "found before Ray starts" no longer
    depends on this file sorting before the first Ray-using module, nor do the checks that apply only when raysft
    would start Ray itself (the machine's cores)."""
    import ray

    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs)
        raise AssertionError("raysft asked for Ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def run_cli(args, capfd):
    """(exit status, the raysft error lines on stderr, all it printed: stderr then stdout)."""
    capfd.readouterr()
    code = main(args)
    printed = capfd.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("raysft: error: ")]
    return code, errors, printed.err + printed.out


@pytest.mark.parametrize("overrides, expected", [(c[0], c[1:]) for c in BAD_CONFIGS],
                         ids=[" ".join(c[0])[:40] for c in BAD_CONFIGS])
def test_bad_config(tmp_path, capfd, overrides, expected, ray_calls):
    code, errors, err = run_cli(["train", good_config(tmp_path), *overrides], capfd)
    assert (code, errors) == (2, [f"raysft: error: {line}" for line in expected])
    assert "Traceback" not in err
    assert not ray_calls  # found before Ray started


def test_a_tracker_that_is_not_installed_or_has_no_server_is_refused_before_ray(tmp_path, capfd, monkeypatch,
                                                                                ray_calls):
    from raysft.config import checks

    monkeypatch.setattr(checks, "installed", lambda module: module != "wandb")
    code, errors, _ = run_cli(["train", good_config(tmp_path), "train.report_to=[wandb]"], capfd)
    assert (code, errors) == (2, ["raysft: error: command line: train.report_to: wandb is not installed (got "
                                  "'wandb'). fix: pip install 'raysft[wandb]', or remove wandb from train.report_to"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, errors, _ = run_cli(["train", good_config(tmp_path), "train.report_to=[mlflow]"], capfd)
    assert (code, errors) == (2, ["raysft: error: train.tracking_uri: mlflow needs a tracking server, and neither "
                                  "train.tracking_uri nor MLFLOW_TRACKING_URI is set. fix: start one (`mlflow server "
                                  "--host 127.0.0.1 --port 5000`) and set train.tracking_uri=http://127.0.0.1:5000"])
    assert not ray_calls


def test_a_broken_chat_template_is_refused_before_ray_with_the_record(tmp_path, capfd, ray_calls):
    """A .jinja file whose turns end with no control token: one line naming the first record, exit 2, no Ray."""
    template = tmp_path / "plain.jinja"
    template.write_text("{%- for m in messages %}{{- '### ' + m['role'] + ':\\n' + m['content'] + '\\n\\n' }}"
                        "{%- endfor %}{%- if add_generation_prompt %}{{- '### assistant:\\n' }}{%- endif %}")
    code, errors, err = run_cli(["prepare", good_config(tmp_path), f"data.chat_template={template}"], capfd)
    assert (code, errors) == (2, [
        f"raysft: error: {SAMPLE}:1: messages[2]: the chat template ends this assistant turn without a control token "
        "(it ends with \"'c' appears 1 time.\"), and no control token opens the next turn, so the model would never "
        "learn to stop; fix: add the template's end-of-turn token "
        "to the tokenizer as a special token, or use data.chat_template: chatml (found by the chat template check "
        "before training, on the first 64 records; it is the template or the tokenizer, not this record alone)"])
    assert "Traceback" not in err and not ray_calls


BAD_FILES = [  # (what to make at the data path, the error; {file} is the path) — all found before Ray starts
    ("empty", "data.train_files: has no records (the file is empty or only blank lines) (got '{file}'). fix: give a "
              "file with one JSON object per line, or leave this one out"),
    ("blank", "data.train_files: has no records (the file is empty or only blank lines) (got '{file}'). fix: give a "
              "file with one JSON object per line, or leave this one out"),
    ("directory", "data.train_files: is a directory, not a data file (got '{file}'). fix: name the files in it, "
                  "e.g. {file}/*.jsonl"),
]


@pytest.mark.parametrize("kind, expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
@pytest.mark.parametrize("command", ["prepare", "train"])
def test_bad_file_is_named_before_ray_starts(tmp_path, capfd, kind, expected, command, ray_calls):
    path = tmp_path / "data.jsonl"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_text("" if kind == "empty" else "\n  \n\t\n")
    code, errors, err = run_cli([command, good_config(tmp_path), f"data.train_files={path}"], capfd)
    assert (code, errors) == (2, [f"raysft: error: {expected.format(file=path)}"])
    assert "Traceback" not in err
    assert not ray_calls
    assert not (tmp_path / "run" / "prepared").exists()


def gzip_records(n):
    import gzip
    import json

    return gzip.compress(b"".join(json.dumps({"text": f"record number {i}"}).encode() + b"\n" for i in range(n)))


def test_damaged_gzip_yields_the_records_before_the_damage_then_one_error(tmp_path):
    """Cut (a partial download) or random bytes written into the gzip member: never an exception, only records
    and, last, one RecordError naming the file and the line after the last good one."""
    import random

    from raysft.data.reading import read_chunk
    from raysft.data.records import RecordError
    from raysft.data.sources import Chunk

    whole = gzip_records(3000)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    out = list(read_chunk(Chunk(str(cut), "jsonl.gz", 0, 0, 1)))
    good, last = out[:-1], out[-1]
    assert [line for _, line, _, rec in good] == list(range(1, len(good) + 1)) and 0 < len(good) < 3000
    assert all(rec == {"text": f"record number {i}"} for i, (_, _, _, rec) in enumerate(good))
    assert isinstance(last[3], RecordError) and last[3].reason == "damaged_file"
    assert str(last[3]) == (f"{cut}:{len(good) + 1}: the compressed file is cut short or damaged after line "
                            f"{len(good)} (EOFError: Compressed file ended before the end-of-stream marker was "
                            "reached); the records before it are read. fix: download or compress the file again "
                            "(`gzip -t cut.jsonl.gz` checks it)")
    rng = random.Random(0)
    for trial in range(40):  # fuzz: random bytes into the compressed member (after the 10-byte header)
        damaged = bytearray(whole)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(10, len(damaged))] = rng.randrange(256)
        path = tmp_path / f"fuzz{trial}.jsonl.gz"
        path.write_bytes(bytes(damaged))
        items = list(read_chunk(Chunk(str(path), "jsonl.gz", 0, 0, 1)))  # never raises
        assert all(isinstance(rec, (dict, RecordError)) for _, _, _, rec in items)
        errors = [rec for _, _, _, rec in items if isinstance(rec, RecordError) and rec.reason == "damaged_file"]
        assert len(errors) <= 1 and (not errors or items[-1][3] is errors[0])


def test_an_unexpected_error_in_a_task_is_one_line_with_the_chunk_and_a_log(tmp_path, monkeypatch):
    """Any exception but a UserError inside the Ray Data task (here a stand-in bug) reaches the driver as one line
    naming the chunk's file and lines, and a log file holding the traceback."""
    from raysft.data import pipeline
    from raysft.data.chunks import Settings
    from raysft.data.sources import Chunk

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}')
    work = str(tmp_path / "run" / "prepared" / "abc.tmp-1")
    pipeline.make_work_dir(work)

    def bug(*args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "chunk_to_examples", bug)
    monkeypatch.setattr(pipeline, "_tokenizer", lambda work, class_path: None)
    settings = Settings(64, True, "completion", None, "error", "truncate", "train", 0.0)
    task = pipeline.Task(settings, work, "train", log_dir=str(tmp_path / "run" / "logs"))
    chunk = Chunk(str(data), "jsonl", 0, data.stat().st_size, 1, 0).as_row()
    pipeline.process_chunks({k: [v] for k, v in chunk.items()}, task)
    log = tmp_path / "run" / "logs" / "prepare-train-000000.log"
    assert str(pipeline.first_error(work)) == (
        f"{data}:lines 1-3: preparing these records failed (ZeroDivisionError: division by zero). fix: check these "
        f"lines; if they look right, report it with the traceback in {log}")
    assert "Traceback" in log.read_text() and "raise ZeroDivisionError" in log.read_text()


@pytest.mark.ray
def test_skip_counts_a_too_deep_record_and_keeps_a_cut_files_records(tmp_path, ray_session):
    import json

    from raysft.config import load_config
    from raysft.prepare import prepare

    whole = gzip_records(400)
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(whole[: len(whole) // 2])
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + DEEP + "\n")
    cfg = load_config(good_config(tmp_path), [f"data.train_files=[{gz}, {deep}]", "data.on_bad_record=skip"])
    path, manifest = prepare(cfg)
    from raysft.data.reading import read_chunk
    from raysft.data.sources import Chunk

    before_cut = sum(1 for *_, rec in read_chunk(Chunk(str(gz), "jsonl.gz", 0, 0, 1)) if isinstance(rec, dict))
    assert 0 < before_cut < 400
    assert manifest["records_kept"] == before_cut + 1
    assert manifest["rejected_by_reason"] == {"damaged_file": 1, "too_deep": 1}
    with open(os.path.join(path, manifest["rejects_file"]), encoding="utf-8") as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["where"], r["reason"]) for r in rejects] == [(f"{gz}:{before_cut + 1}", "damaged_file"),
                                                            (f"{deep}:2", "too_deep")]


# Last in this file: these use the session's Ray, and the tests above check that nothing started one.
# a record bad by itself: the fix also names the policy that would skip it (raysft/data/chunks.py)
SKIP_HINT = "; or skip such records with data.on_bad_record: skip (counted, and written to the rejects file)"
BAD_DATA = [(text, expected + SKIP_HINT) for text, expected in BAD_DATA]


@pytest.mark.ray
@pytest.mark.parametrize("text, expected", BAD_DATA, ids=[c[0][:30] or "empty" for c in BAD_DATA])
def test_bad_data(tmp_path, capfd, ray_session, text, expected):
    """`raysft prepare` (the CLI's main, on the session's Ray): the record's one line on stderr, exit 2, no
    traceback."""
    data = tmp_path / "train.jsonl"
    data.write_text(text)
    code, errors, err = run_cli(["prepare", good_config(tmp_path), f"data.train_files={data}"], capfd)
    assert (code, errors) == (2, [f"raysft: error: {expected.format(file=data)}"]), err[-3000:]
    assert "Traceback" not in err


@pytest.mark.ray
@pytest.mark.e2e
def test_bad_data_in_its_own_process_is_one_line(tmp_path):
    """The same as a user runs it: `raysft prepare` in its own process with its own Ray; everything it prints on
    stderr is what a user sees (the first bad-data case; the table above runs the others in this process)."""
    import subprocess

    text, expected = BAD_DATA[0]
    data = tmp_path / "train.jsonl"
    data.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(["raysft", "prepare", good_config(tmp_path), f"data.train_files={data}", "cluster.num_cpus=2"],
                       env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("raysft: error: ")]
    assert (r.returncode, errors) == (2, [f"raysft: error: {expected.format(file=data)}"]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.ray
def test_damaged_gzip_stops_prepare_with_one_line(tmp_path, capfd, ray_session):
    whole = gzip_records(500)
    data = tmp_path / "train.jsonl.gz"
    data.write_bytes(whole[: len(whole) * 2 // 3])
    code, errors, err = run_cli(["prepare", good_config(tmp_path), f"data.train_files={data}"], capfd)
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"raysft: error: {data}:") and "cut short or damaged after line" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "prepared").exists()  # a failed prepare leaves nothing behind
