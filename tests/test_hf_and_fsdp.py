"""The hf backend (TRL SFTTrainer in Ray Train workers) and the fsdp backend (PyTorch's FSDP2, DCP checkpoints)
against the deepspeed backend, and eval on each: same config, tiny model, CPU, fp32, 2 workers, 20 steps; the faults
and resizes each backend answers in its own way. (Was test_hf.py; the fsdp backend's tests joined it to share the
20-step runs.)"""

import json
import math
import os

import pytest
import torch

from raysft.train.launch import train
from raysft.train.metrics import read_metrics

from faults import Faults, load_probe
from helpers import ROOT, SHARED, base_config, config_file, train_in_thread, wait_for, weights

pytestmark = pytest.mark.ray
SAMPLE = os.path.join(ROOT, "examples", "data", "sample_prefs.jsonl")
EVAL = os.path.join(ROOT, "examples", "data", "sample_eval.jsonl")


PROMPTS = ["What is 27 + 15?", "Reverse the word 'maple'."]


def backend_config(tmp_path, model_dir, name, backend, **sections):
    from raysft.config import load_config

    cfg = base_config(tmp_path / name, model_dir, SAMPLE)
    cfg["data"].update({"max_seq_len": 256, "eval_files": EVAL, "prepared_path": SHARED.get("prepared", ""),
                        **sections.get("data", {})})
    cfg["train"] = {"backend": backend, "micro_batch_size": 2, "global_batch_size": 8, "max_steps": 20, "lr": 3e-3,
                    "dtype": "fp32", "zero_stage": 2, "warmup_steps": 2, "weight_decay": 0.01,
                    "eval_every_steps": 10, **sections.get("train", {})}
    cfg["checkpoint"] = {"every_steps": 5, "keep": 2, **sections.get("checkpoint", {})}
    cfg["cluster"] = {"num_workers": 2, "max_failures": 2, **sections.get("cluster", {})}
    cfg["run_name"] = "run"
    return load_config(config_file(tmp_path, cfg, f"{name}.yaml"))


BACKENDS = ("deepspeed", "hf", "fsdp")
KEEP = {"fsdp": 4}  # the fsdp run keeps every checkpoint: the resize test resumes from step 10


def reference_config(tmp_path, model_dir, backend, name="run"):
    """The config of a backend's 20-step run (`runs`); a fault test trains it again under another name."""
    return backend_config(tmp_path, model_dir, name, backend, train={"eval_prompts": PROMPTS,
                                                                     "eval_max_new_tokens": 12},
                          checkpoint={"keep": KEEP.get(backend, 2)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, ray_session):
    """Each backend's uninterrupted 20-step run, (config, train's result); the trained model's logits of the first
    row in probe.pt."""
    out = {}
    for backend in BACKENDS:
        cfg = reference_config(tmp_path_factory.mktemp(backend), tiny_model_dir, backend)
        out[backend] = (cfg, train(None, [], cfg=cfg, hooks=Faults(probe=os.path.join(cfg.output_dir, "probe.pt"))))
    return out


@pytest.mark.parametrize("backend", ["hf", "fsdp"])
def test_each_backend_gives_the_deepspeed_backends_losses_eval_and_weights(runs, backend):
    """Per-step losses, eval losses and final weights equal the deepspeed backend's within 1e-4 (relative)."""
    (ds_cfg, ds), (hf_cfg, hf) = runs["deepspeed"], runs[backend]
    a, b = read_metrics(ds_cfg.output_dir), read_metrics(hf_cfg.output_dir)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
        assert x["samples_seen"] == y["samples_seen"] and x["tokens_seen"] == y["tokens_seen"]
    assert a[-1]["loss"] < a[0]["loss"] - 1.0
    evals = [(x["step"], x["eval_loss"], y["eval_loss"]) for x, y in zip(a, b) if "eval_loss" in x]
    assert [e[0] for e in evals] == [10, 20] and all("eval_loss" in y for y in b if y["step"] in (10, 20))
    assert all(abs(e[1] - e[2]) <= 1e-4 * e[1] for e in evals), evals
    wa, wb = weights(ds["final"]), weights(hf["final"])
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4 * wa[k].abs().max().item())


def test_eval_prompts_are_answered_at_each_eval_by_every_backend(runs):
    """train.eval_prompts: at steps 10 and 20, each prompt's greedy answer in samples.jsonl, on the console and in
    TensorBoard; the three backends (same weights) say the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    answers = {}
    for backend, (cfg, _) in runs.items():
        with open(os.path.join(cfg.output_dir, "samples.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (10, 20) for p in PROMPTS]
        assert all(isinstance(r["answer"], str) for r in rows), rows
        answers[backend] = [r["answer"] for r in rows]
        with open(os.path.join(cfg.output_dir, "console.log"), encoding="utf-8") as f:
            console = f.read()
        assert f"sample step 20: {PROMPTS[1]!r} -> {rows[3]['answer']!r}" in console
        events = EventAccumulator(os.path.join(cfg.output_dir, "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()
        assert [e.step for e in events.Tensors("samples/text_summary")] == [10, 20]
    assert answers["deepspeed"] == answers["hf"] == answers["fsdp"]


def test_eval_loss_is_the_mean_over_every_eval_token_of_all_workers(runs):
    """The step-20 eval (2 workers, round-robin rows) equals one process's mean over all eval rows, final model."""
    from transformers import AutoModelForCausalLM

    from raysft.data.prepared import PreparedRows, location
    from raysft.loss import token_loss_sum
    from raysft.modeling import collate

    cfg, result = runs["hf"]
    last = read_metrics(cfg.output_dir)[-1]
    fingerprint = json.load(open(os.path.join(result["checkpoint"], "state.json")))["fingerprint"]
    rows = PreparedRows(location(cfg.data.prepared_path, fingerprint), "eval")
    model = AutoModelForCausalLM.from_pretrained(result["final"]).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            batch = collate(rows.get([i]), 0)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            total += token_loss_sum(logits, batch["labels"]).item()
            count += int((batch["labels"][:, 1:] != -100).sum())
    assert last["eval_tokens"] == count
    assert abs(last["eval_loss"] - total / count) <= 1e-5 * last["eval_loss"]
    assert last["eval_ppl"] == pytest.approx(math.exp(last["eval_loss"]))


def test_eval_loss_is_drawn_on_the_loss_png(runs):
    from raysft.train.metrics import loss_figure

    cfg, _ = runs["hf"]
    fig = loss_figure(read_metrics(cfg.output_dir), "run: tiny-model, 20 steps")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["eval loss"].get_xdata()) == [10, 20] and lines["eval loss"].get_marker() == "o"
    assert list(lines["train loss"].get_xdata()) == list(range(1, 21)) and lines["train loss"].get_marker() == "."
    assert fig.axes[0].get_title() == "run: tiny-model, 20 steps"
    assert os.path.getsize(os.path.join(cfg.output_dir, "loss.png")) > 1000


def test_hf_checkpoint_folder_export_and_generate(runs, capsys):
    from transformers import AutoModelForCausalLM

    from raysft.cli import main

    cfg, result = runs["hf"]
    ckpt = result["checkpoint"]
    assert os.path.basename(ckpt) == "checkpoint_00000020"
    assert sorted(os.listdir(ckpt)) == ["config.yaml", "files.rank0.json", "files.rank1.json", "manifest.json",
                                        "model", "state.json", "tokenizer"]
    model_files = set(os.listdir(os.path.join(ckpt, "model")))
    assert {"latest", "global_step20", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth",
            "scheduler.pt"} <= model_files
    state = json.load(open(os.path.join(ckpt, "state.json")))
    assert (state["backend"], state["step"], state["samples_seen"], state["world_size"]) == ("hf", 20, 160, 2)
    probe = load_probe(os.path.join(cfg.output_dir, "probe.pt"))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(result["final"])(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["generate", result["final"], "What is 2 + 2?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize("backend", ["hf", "fsdp"])
def test_sigkill_of_a_worker_process_resumes_and_ends_identical_on_each_backend(runs, tmp_path, tiny_model_dir,
                                                                                backend):
    """The fault test of the deepspeed worker, on the hf and fsdp workers: same losses and weights as the
    uninterrupted run."""
    import signal

    import psutil

    from raysft import checkpoint as ckpt

    ref_cfg, ref = runs[backend]
    cfg = backend_config(tmp_path, tiny_model_dir, "killed", backend)
    step5 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(5))
    thread, outcome = train_in_thread(cfg)
    wait_for(lambda: ckpt.verify(step5, checksums=False) is None, thread)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    ms = read_metrics(cfg.output_dir)
    assert max(m["resumed_from"] for m in ms) >= 5 and [m["step"] for m in ms] == list(range(1, 21))
    assert [m["loss"] for m in ms] == [m["loss"] for m in read_metrics(ref_cfg.output_dir)]
    a, b = weights(ref["final"]), weights(outcome["result"]["final"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_worker_killed_while_writing_a_checkpoint_never_uses_the_half_written_one(runs, tmp_path, tiny_model_dir):
    """Rank 0 stops inside its step-10 checkpoint, after every rank uploaded its files and before the manifest, and
    is SIGKILLed: storage holds a step-10 folder Ray has committed but raysft never verified; the run resumes from
    step 5, not 10, and ends identical to the uninterrupted run."""
    import signal

    from raysft import checkpoint as ckpt
    ref_cfg, ref = runs["hf"]
    cfg = backend_config(tmp_path, tiny_model_dir, "halfckpt", "hf")
    marker = os.path.join(cfg.output_dir, ".paused-in-checkpoint-step10")
    step10 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(10))
    thread, outcome = train_in_thread(cfg, Faults(cfg.output_dir, pause_in_checkpoint_step=10))
    wait_for(lambda: os.path.exists(marker) and open(marker).read().strip()
             and os.path.exists(os.path.join(step10, "files.rank0.json"))
             and os.path.exists(os.path.join(step10, "files.rank1.json")), thread)
    assert ckpt.verify(step10) == "no valid manifest.json (FileNotFoundError)"  # half-written in storage
    os.kill(int(open(marker).read()), signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    ms = read_metrics(cfg.output_dir)
    assert max(m["resumed_from"] for m in ms) == 5
    assert [m["loss"] for m in ms] == [m["loss"] for m in read_metrics(ref_cfg.output_dir)]
    a, b = weights(ref["final"]), weights(outcome["result"]["final"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_an_hf_run_on_another_worker_count_or_backend_is_refused_before_training(runs, tmp_path):
    import dataclasses
    import shutil

    from raysft.errors import UserError

    cfg, _ = runs["hf"]
    out = str(tmp_path / "copy")
    shutil.copytree(cfg.output_dir, out)
    shutil.rmtree(os.path.join(out, "ray", "run", "checkpoint_00000020"))  # the run stopped after step 15
    good = os.path.join(out, "ray", "run", "checkpoint_00000015")
    moved = dataclasses.replace(cfg, output_dir=out, checkpoint=dataclasses.replace(
        cfg.checkpoint, storage_path=os.path.join(out, "ray")))
    one = dataclasses.replace(moved, cluster=dataclasses.replace(cfg.cluster, num_workers=1))
    with pytest.raises(UserError) as info:
        train(None, [], cfg=one, log=lambda s: None)
    assert str(info.value) == (
        f"cluster.num_workers: {good} was written by 2 workers and the hf backend resumes only on as many (got 1). "
        "fix: resume with cluster.num_workers=2 (the deepspeed backend converts to DeepSpeed's universal checkpoint "
        "for another count, the fsdp backend's DCP checkpoints reshard on load)")
    other = dataclasses.replace(moved, train=dataclasses.replace(cfg.train, backend="deepspeed"))
    with pytest.raises(UserError) as info:
        train(None, [], cfg=other, log=lambda s: None)
    assert str(info.value) == (
        f"train.backend: {good} was written by the hf backend (got 'deepspeed'). fix: resume with train.backend=hf, "
        "or export it (raysft export) and start a new run from the exported model")
    assert max(m["step"] for m in read_metrics(out)) == 20  # nothing trained


def test_train_compile_gives_the_same_losses(runs, reference, tmp_path, tiny_model_dir):
    """train.compile: true (torch.compile through DeepSpeed / the Trainer) trains the same steps as without: the
    deepspeed backend the session's 6-step reference run, the hf backend this module's 20-step run. (The deepspeed
    case trained the 20-step run before; compiling costs most of its time, fewer steps and no eval cost less.)"""
    from helpers import run_config

    compiled = {"deepspeed": run_config(tmp_path, tiny_model_dir, "compiled-ds", train={"compile": True}),
                # without eval data (it trains the same steps, tested above): no eval graphs to compile
                "hf": backend_config(tmp_path, tiny_model_dir, "compiled-hf", "hf", train={"compile": True},
                                data={"eval_files": []})}
    plain = {"deepspeed": reference[0], "hf": runs["hf"][0]}
    for backend, cfg in compiled.items():
        stats = os.path.join(str(tmp_path), f"dynamo-{backend}.json")
        train(None, [], cfg=cfg, hooks=Faults(dynamo_stats=stats))
        with open(stats) as f:
            assert json.load(f).get("unique_graphs", 0) > 0  # it really was compiled
        a, b = read_metrics(plain[backend].output_dir), read_metrics(cfg.output_dir)
        assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(1, cfg.train.max_steps + 1))
        for x, y in zip(a, b):
            assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (backend, x["step"], x["loss"], y["loss"])


def test_fsdp_checkpoint_folder_export_and_generate(runs, capsys):
    """The fsdp backend's checkpoint: a DCP checkpoint in model/ (every rank's shard, rank 0's index, the model's
    config), each rank's RNG, under raysft's manifest; the export equals the trained model; generate answers."""
    from transformers import AutoModelForCausalLM

    from raysft.cli import main

    cfg, result = runs["fsdp"]
    ckpt = result["checkpoint"]
    assert sorted(os.listdir(ckpt)) == ["config.yaml", "files.rank0.json", "files.rank1.json", "manifest.json",
                                        "model", "rng", "state.json", "tokenizer"]
    assert sorted(os.listdir(os.path.join(ckpt, "model"))) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                               "config.json"]
    assert sorted(os.listdir(os.path.join(ckpt, "rng"))) == ["rank0.pt", "rank1.pt"]
    manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
    assert {"model/.metadata", "model/__0_0.distcp", "model/__1_0.distcp"} <= {f["path"] for f in manifest["files"]}
    state = json.load(open(os.path.join(ckpt, "state.json")))
    assert (state["backend"], state["step"], state["samples_seen"], state["world_size"]) == ("fsdp", 20, 160, 2)
    with open(os.path.join(cfg.output_dir, "console.log"), encoding="utf-8") as f:
        console = f.read()
    assert ("8 rows/step, FSDP2, kept gathered from forward to backward (ZeRO-2-like), fp32, backend fsdp\n"
            in console)
    assert "deepspeed" not in console.replace("backend fsdp", "")  # no DeepSpeed extension compiled or loaded
    probe = load_probe(os.path.join(cfg.output_dir, "probe.pt"))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(result["final"])(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["generate", result["final"], PROMPTS[1], "--max-new-tokens", "12"]) == 0
    with open(os.path.join(cfg.output_dir, "samples.jsonl"), encoding="utf-8") as f:
        last = [json.loads(line) for line in f][-1]
    assert (last["step"], last["prompt"]) == (20, PROMPTS[1])
    assert capsys.readouterr().out.strip() == last["answer"].strip()  # the export answers as the run's last eval did


def test_an_fsdp_run_skips_a_damaged_checkpoint_and_continues_on_one_then_two_workers(runs, tmp_path,
                                                                                      tiny_model_dir):
    """2 -> 1 -> 2 workers through DCP's own resharding (no conversion step). A copy of the fsdp run stopped after
    step 15, its step-15 checkpoint damaged (rank 1's shard cut short): 1 worker skips it with a warning naming it,
    resumes from step 10 (with gradient checkpointing on: it recomputes, the losses stay), trains, checkpoints step
    15 into the damaged one's place and fails; 2 workers resume that 1-worker checkpoint and train to 20: the same
    samples, losses and eval loss within 1e-5 of the uninterrupted run, final weights within 1e-5."""
    import shutil

    from raysft import checkpoint as ckpt

    ref_cfg, ref = runs["fsdp"]
    one = backend_config(tmp_path, tiny_model_dir, "resize", "fsdp", train={"gradient_checkpointing": True},
                         cluster={"num_workers": 1, "max_failures": 0}, checkpoint={"keep": 4})
    shutil.copytree(ref_cfg.output_dir, one.output_dir, ignore=shutil.ignore_patterns("final", ckpt.dir_name(20)))
    step15 = os.path.join(one.checkpoint.storage_path, one.run_name, ckpt.dir_name(15))
    shard = os.path.join(step15, "model", "__1_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)
    logs = []
    with pytest.raises(Exception, match="injected failure after step 15"):  # after its step-15 checkpoint
        train(None, [], cfg=one, log=logs.append, hooks=Faults(one.output_dir, fail_after_step=15))
    assert any(line.startswith(f"checkpoint: skipping {step15}: ") and "__1_0.distcp" in line for line in logs), logs
    assert any(line.startswith(f"resume: from {os.path.dirname(step15)}/{ckpt.dir_name(10)} at step 10 (epoch 0, "
                               "80 rows seen, written by 2 workers, resharded by DCP)") for line in logs), logs
    two = backend_config(tmp_path, tiny_model_dir, "resize", "fsdp", checkpoint={"keep": 4})
    train(None, [], cfg=two, log=logs.append)
    assert f"resume: from {step15} at step 15 (epoch 0, 120 rows seen, written by 1 worker, resharded by DCP)" in logs
    assert not any("universal" in line for line in logs)
    ms, ref_ms = read_metrics(two.output_dir), read_metrics(ref_cfg.output_dir)
    assert [m["step"] for m in ms] == list(range(1, 21))
    assert [m["resumed_from"] for m in ms] == [0] * 10 + [10] * 5 + [15] * 5
    assert [m["samples_seen"] for m in ms] == [m["samples_seen"] for m in ref_ms]
    assert [m["tokens_seen"] for m in ms] == [m["tokens_seen"] for m in ref_ms]
    for key in ("loss", "eval_loss"):
        pairs = [(m[key], r[key]) for m, r in zip(ms, ref_ms) if key in r]
        assert pairs and all(abs(a - b) <= 1e-5 * abs(b) for a, b in pairs), (key, pairs)
    state = {s: json.load(open(os.path.join(os.path.dirname(step15), ckpt.dir_name(s), "state.json")))
             for s in (15, 20)}
    assert (state[15]["world_size"], state[20]["world_size"]) == (1, 2)
    a, b = weights(ref["final"]), weights(os.path.join(two.output_dir, "final"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5 * a[k].abs().max().item())


def test_fsdp_in_bf16_resharded_after_forward_and_compiled_trains_as_fp32_does(reference, tmp_path, tiny_model_dir):
    """train.dtype=bf16 (FSDP2's MixedPrecisionPolicy: bf16 compute, fp32 reduction and master weights),
    zero_stage=3 (resharded after forward) and train.compile (each layer compiled before it is sharded), on the
    session's 6-step reference run's config: every layer really compiled, the per-step losses within bf16's
    precision (1e-2 relative) of the deepspeed backend's fp32 run, learning, a bf16 export."""
    from helpers import run_config

    cfg = run_config(tmp_path, tiny_model_dir, "fsdp-bf16", train={"backend": "fsdp", "dtype": "bf16",
                                                                    "zero_stage": 3, "compile": True})
    stats = os.path.join(str(tmp_path), "dynamo.json")
    logs = []
    result = train(None, [], cfg=cfg, log=logs.append, hooks=Faults(dynamo_stats=stats))
    with open(stats) as f:
        assert json.load(f).get("unique_graphs", 0) >= 2  # the tiny model's two decoder layers
    assert any("FSDP2, resharded after forward (ZeRO-3-like), bf16, backend fsdp" in line for line in logs), logs
    a, b = read_metrics(reference[0].output_dir), read_metrics(cfg.output_dir)
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-2 * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    assert b[-1]["loss"] < b[0]["loss"] - 0.5
    assert {v.dtype for v in weights(result["final"]).values()} == {torch.bfloat16}
