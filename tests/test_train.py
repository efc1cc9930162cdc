"""`raysft train` on Ray Train with the DeepSpeed worker (CPU, fp32, tiny model): loss, resume, export, generate."""

import json
import os
import re

import pytest
import torch

from raysft.config import load_config
from raysft.train.launch import train
from raysft.train.metrics import read_metrics

from faults import Faults, load_probe
from helpers import ROOT, SHARED, assert_same_as_reference, run_config, train_in_thread, wait_for, weights

pytestmark = pytest.mark.ray


def test_loss_goes_down_and_run_folder_is_complete(reference):
    cfg, result = reference
    losses = [m["loss"] for m in read_metrics(cfg.output_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3
    ckpt_dir = result["checkpoint"]
    assert os.path.basename(ckpt_dir) == "checkpoint_00000006"
    assert sorted(os.listdir(ckpt_dir)) == ["config.yaml", "files.rank0.json", "files.rank1.json", "manifest.json",
                                            "model", "rng", "state.json", "tokenizer"]
    state = json.load(open(os.path.join(ckpt_dir, "state.json")))
    assert {k: state[k] for k in ("step", "samples_seen", "world_size", "backend", "final")} == {
        "step": 6, "samples_seen": 48, "world_size": 2, "backend": "deepspeed", "final": True}
    # checkpoint.keep=2: the two newest stay
    kept = sorted(f for f in os.listdir(os.path.dirname(ckpt_dir)) if f.startswith("checkpoint_0"))
    assert kept == ["checkpoint_00000004", "checkpoint_00000006"]
    assert os.path.exists(os.path.join(cfg.output_dir, "loss.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(cfg.output_dir, "tensorboard")))
    assert set(read_metrics(cfg.output_dir)[0]) >= {"loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction",
                                                   "data_wait", "step_time", "eta_s"}


def test_injected_failures_resume_on_the_next_sample_and_a_failed_run_started_again_after_pruning(reference, tmp_path,
                                                                                                 tiny_model_dir):
    """A worker fails after step 3: Ray Train restarts the group (cluster.max_failures: 1), which resumes from the
    step-2 checkpoint. With checkpoint.keep=1, committing step 4 deletes step 2, which Ray Train's own checkpoint list
    still names; the worker fails again after step 5 and the run fails (no retries left). Started again, it must
    resume from step 4 (Ray refused to start a run whose list names a missing checkpoint, until raysft cleared that
    list). Each step is once in metrics.jsonl, the resumed attempt's, and the run ends identical to an uninterrupted
    one. (Was two tests, the in-job restart and the failed run started again, each a run of its own.)"""
    cfg = run_config(tmp_path, tiny_model_dir, "failing", checkpoint={"keep": 1})
    with pytest.raises(Exception, match="injected failure after step 5"):
        train(None, [], cfg=cfg, log=lambda s: None, hooks=Faults(cfg.output_dir, fail_after_steps=(3, 5)))
    run_dir = os.path.join(cfg.checkpoint.storage_path, cfg.run_name)
    assert sorted(f for f in os.listdir(run_dir) if f.startswith("checkpoint_0")) == ["checkpoint_00000004"]
    assert "checkpoint_00000002" in open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")).read()
    logs = []
    result = train(None, [], cfg=cfg, log=logs.append)
    assert f"train: cleared Ray Train's checkpoint list in {run_dir}; resuming from raysft's verified checkpoints" \
        in logs
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    # step 3 ran twice (before the failure, and after resuming at step 2), step 5 too: each is in the file once
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["resumed_from"] for m in logged] == [0, 0, 2, 2, 4, 4]
    assert_same_as_reference(reference, cfg, result)


def test_running_a_finished_run_again_trains_nothing(reference):
    cfg, result = reference
    logs = []
    again = train(None, [], cfg=cfg, log=logs.append)
    assert again["trained"] is False and again["step"] == 6
    assert any("already finished at step 6" in line for line in logs)


def cli(*args, timeout=300):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(["raysft", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_finished_run_is_answered_and_a_changed_schedule_refused_before_ray_starts(reference, tmp_path):
    """Run again as a user would (its own process): `already finished` with no Ray started (no `ray:` line); a
    changed length or learning-rate setting is refused with both ways forward, also before Ray."""
    from raysft.config import to_yaml

    cfg, result = reference
    path = tmp_path / "again.yaml"
    path.write_text(to_yaml(cfg))
    r = cli("train", str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"train: run 'run' already finished at step 6 ({result['checkpoint']}); nothing to train" in r.stdout
    assert "ray: " not in r.stdout and "Traceback" not in r.stderr
    r = cli("train", str(path), "train.max_steps=9", "train.lr=0.01")
    errors = [line for line in r.stderr.splitlines() if line.startswith("raysft: error: ")]
    assert (r.returncode, errors) == (2, [
        f"raysft: error: checkpoint: run 'run' was started with another schedule: train.max_steps 6 -> 9, train.lr "
        f"0.003 -> 0.01 (its checkpoint {result['checkpoint']} is at step 6 of 6). fix: to train further, start a "
        f"new run from its model (model.name_or_path={cfg.output_dir}/final and another output_dir or run_name); or "
        "set checkpoint.allow_schedule_change=true to continue this run on the new schedule knowingly"])
    assert "ray: " not in r.stdout
    # asked for knowingly (on a copy of the run; in this process, on the session's Ray): it continues from step 6
    # to the new length
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cfg.output_dir, copy)
    train(str(path), [f"output_dir={copy}", f"checkpoint.storage_path={copy}/ray", "train.max_steps=9",
                      "checkpoint.allow_schedule_change=true"], log=lambda s: None)
    continued = read_metrics(str(copy))
    assert [m["step"] for m in continued] == list(range(1, 10)) and continued[-1]["resumed_from"] == 6


def test_export_matches_trained_model_and_chat_template(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysft.data import to_chatml

    cfg, result = reference
    final = result["final"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"} <= set(
        os.listdir(final))
    probe = load_probe(os.path.join(cfg.output_dir, "probe.pt"))
    model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(final)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == to_chatml({"messages": messages + [{"role": "assistant", "content": "x"}]})["prompt"]


def test_generate_renders_prompt_and_stops_at_im_end(reference, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysft.cli import main

    _, result = reference
    final = result["final"]
    assert main(["generate", final, "What is 2 + 2?", "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    # the same by hand: greedy decoding of the ChatML prompt, cut at the first <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = tokenizer("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
                    add_special_tokens=False, return_tensors="pt").input_ids
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    with torch.no_grad():
        for _ in range(40):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == im_end:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert printed == tokenizer.decode(out, skip_special_tokens=True)


def test_accumulation_equals_more_workers_across_zero_stages_with_a_saved_model(tmp_path, tiny_model_dir,
                                                                               ray_session):
    """1 worker x accumulation 2 (ZeRO-2) == 2 workers x accumulation 1 (ZeRO-3); model loaded from a folder."""
    from transformers import AutoModelForCausalLM

    from raysft.modeling import build_model

    saved = str(tmp_path / "saved-model")
    build_model(tiny_model_dir, 386, from_scratch=True, seed=5).save_pretrained(saved)
    for f in os.listdir(tiny_model_dir):
        if "token" in f:
            os.link(os.path.join(tiny_model_dir, f), os.path.join(saved, f))
    assert AutoModelForCausalLM.from_pretrained(saved) is not None
    common = {"model": {"name_or_path": saved, "from_scratch": False}}
    prompts = {"eval_prompts": ["What is 2 + 2?"], "eval_max_new_tokens": 8}  # generated with ZeRO-3 on two ranks
    one = run_config(tmp_path, saved, "one", train={"global_batch_size": 4, "max_steps": 4, "zero_stage": 2,
                                                    **prompts}, cluster={"num_workers": 1}, **common)
    two = run_config(tmp_path, saved, "two", train={"global_batch_size": 4, "max_steps": 4, "zero_stage": 3,
                                                    **prompts}, cluster={"num_workers": 2}, **common)
    train(None, [], cfg=one)
    train(None, [], cfg=two)
    l1 = [m["loss"] for m in read_metrics(one.output_dir)]
    l2 = [m["loss"] for m in read_metrics(two.output_dir)]
    assert len(l1) == len(l2) == 4 and l1[-1] < l1[0]
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (l1, l2)
    said = [json.loads(open(os.path.join(c.output_dir, "samples.jsonl")).readline()) for c in (one, two)]
    assert said[0]["step"] == said[1]["step"] == 4 and said[0]["answer"] == said[1]["answer"]


def test_the_quickstart_answers_its_eval_prompts_and_they_change_as_it_learns(tmp_path, ray_session):
    """configs/quickstart.yaml (its eval_prompts), shortened to 120 steps with an eval every 40: the answers at the
    last eval differ from those at the first, and each eval's are on the console."""
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"), [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=120", "train.eval_every_steps=40",
        "checkpoint.every_steps=0", f"data.prepared_path={SHARED['prepared']}"])
    logs = []
    train(None, [], cfg=cfg, log=logs.append)
    with open(os.path.join(cfg.output_dir, "samples.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    prompts = cfg.train.eval_prompts
    assert [r["step"] for r in rows] == [s for s in (40, 80, 120) for _ in prompts]
    first, last = [r["answer"] for r in rows[:len(prompts)]], [r["answer"] for r in rows[-len(prompts):]]
    assert first != last, (first, last)
    with open(os.path.join(cfg.output_dir, "console.log"), encoding="utf-8") as f:
        assert f"sample step 120: {prompts[0]!r} -> {last[0]!r}\n" in f.read()
    # the export's model card (issue 44): from scratch on a local folder, so no base_model; the last answers
    final = os.path.join(cfg.output_dir, "final")
    with open(os.path.join(final, "README.md"), encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(final, "raysft.json"), encoding="utf-8") as f:
        record = json.load(f)
    assert text.split("\n---\n")[0].splitlines() == ["---", "library_name: transformers", "tags:", '- "raysft"',
                                                     '- "sft"']
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Chat template", "## Training data", "## Training procedure", "## Results", "## Framework versions",
        "## Reproduce"]
    assert "initialised from the base model's config (trained from scratch)" in text and "![loss](loss.png)" in text
    assert os.path.exists(os.path.join(final, "loss.png"))
    metrics = read_metrics(cfg.output_dir)
    assert record["results"]["train_loss"] == round(metrics[-1]["loss"], 6) and record["training"]["steps"] == 120
    assert [a["answer"] for a in record["results"]["eval_answers"]] == last
    assert f"**{prompts[0]}**\n\n> " + last[0].replace("\n", "\n> ") in text
    assert record["data"]["inputs"][0]["path"].endswith("sample_prefs.jsonl")


def test_offload_gradient_checkpointing_and_bf16_train(tmp_path, tiny_model_dir, ray_session):
    """ZeRO-2 with the optimizer offloaded to CPU, gradient checkpointing and bf16: runs and learns."""
    cfg = run_config(tmp_path, tiny_model_dir, "offload",
                     train={"max_steps": 4, "dtype": "bf16", "offload_optimizer": True,
                            "gradient_checkpointing": True})
    result = train(None, [], cfg=cfg)
    losses = [m["loss"] for m in read_metrics(cfg.output_dir)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert next(iter(weights(result["final"]).values())).dtype == torch.bfloat16


def test_cli_export_and_a_damaged_checkpoint_is_refused(reference, tmp_path, capsys):
    import shutil

    from raysft.cli import main

    _, result = reference
    out = str(tmp_path / "exported")
    assert main(["export", result["checkpoint"], out]) == 0
    a, b = weights(result["final"]), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()  # drop the first export's progress output
    broken = str(tmp_path / "broken")
    shutil.copytree(result["checkpoint"], broken)
    with open(os.path.join(broken, "state.json"), "a") as f:
        f.write(" ")  # one byte more than the manifest says
    assert main(["export", broken, str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"raysft: error: {broken}: not a whole checkpoint. fix: state.json has {os.path.getsize(broken + '/state.json')}"
        f" bytes, the manifest says {os.path.getsize(broken + '/state.json') - 1} (truncated?); export another one")


def test_resuming_on_other_data_is_refused_unless_allowed(reference, tmp_path):
    import dataclasses

    from raysft.errors import UserError

    cfg, result = reference
    changed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=200))  # another fingerprint
    with pytest.raises(UserError) as info:
        train(None, [], cfg=changed, log=lambda s: None)
    state = json.load(open(os.path.join(result["checkpoint"], "state.json")))
    assert str(info.value).startswith(f"checkpoint: {result['checkpoint']} was trained on other data or data settings")
    assert f"it has fingerprint {state['fingerprint'][:16]}; use another output_dir or run_name, or set " \
           "checkpoint.allow_data_change=true to continue anyway" in str(info.value)
    allowed = dataclasses.replace(changed, checkpoint=dataclasses.replace(cfg.checkpoint, allow_data_change=True))
    assert train(None, [], cfg=allowed, log=lambda s: None)["trained"] is False  # finished: nothing to do


def test_asking_for_more_than_the_cluster_has_fails_fast_naming_both_numbers(tmp_path, tiny_model_dir, ray_session):
    from raysft.errors import UserError

    cfg = run_config(tmp_path, tiny_model_dir, "gpu", shared_prepared=False, cluster={"use_gpu": True})
    with pytest.raises(UserError) as info:
        train(None, [], cfg=cfg)
    assert str(info.value) == ("cluster.use_gpu: 2 workers need {'GPU': 2} but the cluster has {'GPU': 0}. fix: lower "
                               "cluster.num_workers or cluster.resources_per_worker, or add nodes (`ray status` shows "
                               "what the cluster has)")
    assert not os.path.exists(os.path.join(cfg.output_dir, "prepared"))  # nothing started


def test_storage_that_cannot_be_written_is_reported_before_training(tmp_path, tiny_model_dir):
    from raysft.errors import UserError
    from raysft.train.launch import preflight

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = run_config(tmp_path, tiny_model_dir, "blocked")
    cfg.checkpoint.storage_path = str(blocker / "ray")
    with pytest.raises(UserError) as info:
        preflight(cfg)
    assert str(info.value) == (f"checkpoint.storage_path: storage is not writable (got '{blocker}/ray'). fix: choose a "
                               "folder you can write (Not a directory)")


def test_no_secret_from_the_environment_reaches_configs_logs_or_checkpoints(reference):
    from conftest import SECRET_CANARY

    cfg, _ = reference
    leaks = []
    for root, _, files in os.walk(cfg.output_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if SECRET_CANARY.encode() in f.read():
                    leaks.append(os.path.join(root, name))
    assert leaks == []


def assert_tracked(cfg, uri, resumed_from):
    """MLflow (through its client, from the server) holds one tracking run, the one state.json names, with every
    step's loss as metrics.jsonl has it and the resolved config as parameters; W&B (its offline files) the same run
    in each attempt."""
    from mlflow import MlflowClient

    from helpers import wandb_history

    steps = {m["step"]: m["loss"] for m in read_metrics(cfg.output_dir)}
    assert sorted(steps) == list(range(1, 7))
    state = json.load(open(os.path.join(cfg.checkpoint.storage_path, cfg.run_name, "checkpoint_00000006",
                                        "state.json")))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.train.tracking_project).experiment_id])
    assert [r.info.run_id for r in runs] == [state["tracking"]["mlflow"]]  # one run: the resumed attempt continued it
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.run_name
    assert run.data.params["train.lr"] == "0.003" and run.data.params["train.report_to"] == \
        '["tensorboard", "mlflow", "wandb"]' and run.data.params["data.max_seq_len"] == "256"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {h.step for h in history} == set(steps) and all(h.value == steps[h.step] for h in history)
    # the eval prompt's answer at the last step, as samples.jsonl has it
    with open(os.path.join(cfg.output_dir, "samples.jsonl"), encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    assert [(s["step"], s["prompt"]) for s in samples] == [(6, "What is 2 + 2?")]
    from mlflow.artifacts import download_artifacts

    local = download_artifacts(run_id=run.info.run_id, artifact_path="samples/step_00000006.jsonl",
                               dst_path=cfg.output_dir, tracking_uri=uri)
    assert [json.loads(line) for line in open(local, encoding="utf-8")] == samples
    # W&B (offline): a folder per attempt, of the run state.json names. The killed attempt's folder may hold only a
    # header: W&B's service process went down with the worker before writing it out. The resumed attempt logged every
    # step from its checkpoint on, as metrics.jsonl has them, and the config.
    attempts = [a for a in wandb_history(os.path.join(cfg.output_dir, "wandb")) if a["id"]]
    assert attempts and {a["id"] for a in attempts} == {state["tracking"]["wandb"]}
    assert attempts[-1]["config"]["train.lr"] == "0.003"
    logged = {h["_step"]: h["train/loss"] for h in attempts[-1]["history"] if "train/loss" in h}
    assert sorted(logged) == list(range(resumed_from + 1, 7)) and all(logged[s] == steps[s] for s in logged)
    tables = [h for h in attempts[-1]["history"] if "samples/_type" in h]
    assert [(h["_step"], h["samples/_type"], h["samples/nrows"]) for h in tables] == [(6, "table-file", 1)]


def test_sigkill_of_a_worker_process_resumes_and_ends_identical(reference, tmp_path, tiny_model_dir, mlflow_server):
    import signal

    import psutil

    from raysft import checkpoint as ckpt

    # tracked by MLflow (a real server) and W&B (offline): the resumed attempt continues both runs
    cfg = run_config(tmp_path, tiny_model_dir, "killed", cluster={"max_failures": 2}, train={
        "report_to": ["tensorboard", "mlflow", "wandb"], "tracking_uri": mlflow_server, "tracking_project": "killed",
        "eval_prompts": ["What is 2 + 2?"], "eval_max_new_tokens": 4})  # answered at the end (greedy: no RNG drawn)
    step2 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(2))
    thread, outcome = train_in_thread(cfg)
    wait_for(lambda: ckpt.verify(step2, checksums=False) is None, thread)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)  # the process, not an exception
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    resumed = {m["resumed_from"] for m in read_metrics(cfg.output_dir)}
    assert max(resumed) in (2, 4)  # from a committed checkpoint (4 if it was committed before the kill landed)
    assert_same_as_reference(reference, cfg, outcome["result"])
    # the console said why the workers restarted, once: Ray Train's controller saw the death
    with open(os.path.join(cfg.output_dir, "console.log"), encoding="utf-8") as f:
        failed = [line for line in f if " failed (" in line]
    assert len(failed) == 1 and re.match(r"train: workers? [0-9, ]+ failed \(\w+: .+\); restarting the workers from the "
                                         r"last checkpoint \(restart 1 of 2\)$", failed[0]), failed
    assert_tracked(cfg, mlflow_server, max(resumed))


def test_a_worker_killed_while_writing_a_checkpoint_never_leaves_a_used_half_checkpoint(reference, tmp_path,
                                                                                        tiny_model_dir):
    import signal

    from raysft import checkpoint as ckpt
    cfg = run_config(tmp_path, tiny_model_dir, "halfckpt", cluster={"max_failures": 2})
    marker = os.path.join(cfg.output_dir, ".paused-in-checkpoint-step4")
    thread, outcome = train_in_thread(cfg, Faults(cfg.output_dir, pause_in_checkpoint_step=4))
    step4 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(4))
    wait_for(lambda: os.path.exists(marker) and open(marker).read().strip(), thread)
    # every rank's files are in storage (Ray committed them), the manifest is not: rank 0 dies before verifying
    assert {"files.rank0.json", "files.rank1.json"} <= set(os.listdir(step4))
    assert ckpt.verify(step4) == "no valid manifest.json (FileNotFoundError)"
    os.kill(int(open(marker).read()), signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert max(m["resumed_from"] for m in read_metrics(cfg.output_dir)) == 2  # not the unverified step 4
    assert_same_as_reference(reference, cfg, outcome["result"])


def command_of(process) -> str:
    """A process's command line ('' once it is gone or a zombie)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_a_run_continues_on_fewer_then_more_workers(reference, tmp_path, tiny_model_dir):
    """2 -> 1 -> 2 workers. The reference's 2-worker ZeRO-2 checkpoint at step 4 is resumed by 1 worker (converted
    to DeepSpeed's universal checkpoint), which trains and checkpoints step 5 and fails; 2 workers resume that
    1-worker checkpoint (converted again) and train step 6: the same samples, and losses within 1e-5 of the
    uninterrupted run. (Was two tests, 2 -> 1 and 1 -> 2, each training its own first run.)"""
    import shutil

    ref_cfg, _ = reference
    one = run_config(tmp_path, tiny_model_dir, "resize", cluster={"num_workers": 1, "max_failures": 0},
                     checkpoint={"every_steps": 1})
    shutil.copytree(ref_cfg.output_dir, one.output_dir, ignore=shutil.ignore_patterns("final", "checkpoint_00000006"))
    logs = []
    with pytest.raises(Exception, match="injected failure after step 5"):  # after its step-5 checkpoint
        train(None, [], cfg=one, log=logs.append, hooks=Faults(one.output_dir, fail_after_step=5))
    two = run_config(tmp_path, tiny_model_dir, "resize", checkpoint={"every_steps": 1})
    train(None, [], cfg=two, log=logs.append)
    for before, after in ((2, 1), (1, 2)):
        assert any(f"was written by {before} workers, resuming on {after}: converting it to DeepSpeed's universal "
                   "checkpoint" in line for line in logs), (before, after)
    ms = read_metrics(two.output_dir)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6] and [m["resumed_from"] for m in ms][3:] == [0, 4, 5]
    assert ms[-1]["samples_seen"] == 48
    state5 = ckpt_state(two, 5)
    assert (state5["world_size"], ckpt_state(two, 6)["world_size"]) == (1, 2)
    for a, b in zip([m["loss"] for m in ms], [m["loss"] for m in read_metrics(ref_cfg.output_dir)]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))


def ckpt_state(cfg, step: int) -> dict:
    return json.load(open(os.path.join(cfg.checkpoint.storage_path, cfg.run_name, f"checkpoint_{step:08d}",
                                       "state.json")))


@pytest.mark.e2e
def test_an_interrupted_or_killed_run_stops_says_where_and_the_same_command_resumes_it(reference, tmp_path,
                                                                                       tiny_model_dir):
    """`raysft train` (its own process and Ray, a checkpoint every step) stopped four ways, each after a newer
    checkpoint, and the same command run again each time:
    - SIGTERM, then Ctrl-C (SIGINT): exit 143 / 130 within seconds, one line saying where the run stands, every
      process it started gone;
    - SIGKILL of the driver with its whole local Ray (raylet, GCS, Train workers, at once); then of the driver
      alone (its in-process Ray goes down with it, the Train workers within seconds, and they may train a step or
      two first): the next attempt starts once the killed one's processes are gone.
    Each attempt resumes from the last checkpoint; the last ends identical to an uninterrupted run, each step once in
    metrics.jsonl. (Was three tests, the two signals and the two kinds of kill, each with its own first run.)"""
    import contextlib
    import signal
    import subprocess
    import threading
    import time

    import psutil

    from raysft import checkpoint as ckpt

    cfg = run_config(tmp_path, tiny_model_dir, "stopped", checkpoint={"every_steps": 1})
    path = str(tmp_path / "stopped.yaml")  # written by run_config
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_dir = ckpt.run_dir(cfg.checkpoint.storage_path, cfg.run_name)

    def good_step() -> int:
        good = ckpt.latest_good(run_dir, warn=lambda m: None)
        return ckpt.read_state(good).step if good else 0

    for stop in ("SIGTERM", "SIGINT", "kill-ray", "kill-driver"):
        before = good_step()
        if before == 6:  # the Train workers of a killed driver finished the run: nothing left to stop
            break
        proc = subprocess.Popen(["raysft", "train", path], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        out = {"stderr": ""}
        reader = threading.Thread(target=lambda proc=proc, out=out: out.__setitem__("stderr", proc.stderr.read()),
                                  daemon=True)
        reader.start()
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        wait_for(lambda before=before: good_step() > before, proc=proc)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in command_of(p) for p in started)
        t0 = time.time()
        if stop.startswith("SIG"):
            proc.send_signal(getattr(signal, stop))
            assert proc.wait(timeout=30) == 128 + getattr(signal, stop)
            assert time.time() - t0 < 15
            reader.join(timeout=10)
            _, alive = psutil.wait_procs(started, timeout=10)
            assert alive == [], [command_of(p) for p in alive]
            good = ckpt.latest_good(run_dir, warn=lambda m: None)
            reached = read_metrics(cfg.output_dir)[-1]["step"]
            lines = [line for line in out["stderr"].splitlines() if line.startswith("raysft: ")]
            assert lines == [f"raysft: interrupted at step {reached}; last good checkpoint: {good} "
                             f"(step {ckpt.read_state(good).step}); run the same command to resume"], \
                out["stderr"][-3000:]
            assert "Traceback" not in out["stderr"]
            continue
        for process in [psutil.Process(proc.pid)] + (started if stop == "kill-ray" else []):
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # until a killed driver's Ray is down its workers could still train and write (Ray's dashboard and
        # runtime-env agents may outlive it a while: they train nothing)
        training = [p for p in started if not re.search(r"DashboardAgent|RuntimeEnvAgent", command_of(p))]
        _, alive = psutil.wait_procs(training, timeout=60)
        assert alive == [], [command_of(p) for p in alive]
    r = cli("train", path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 7))
    resumed = [m["resumed_from"] for m in read_metrics(cfg.output_dir)]
    assert resumed == sorted(resumed) and resumed[0] == 0 and len(set(resumed)) >= 3, resumed
    assert_same_as_reference(reference, cfg, {"final": os.path.join(cfg.output_dir, "final")})


def console_of(command: str, tmp_path, terminal: bool) -> str:
    """What a person sees running `command`: in a pseudo-terminal (`script`, 120 columns), or piped to a file."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYSFT_VERBOSE")}
    if terminal:
        log = tmp_path / "typescript"
        subprocess.run(["script", "-qfec", f"stty cols 120 rows 40; {command}", str(log)], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=True)
        return log.read_bytes().decode("utf-8", "replace")
    r = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=600, check=True)
    return r.stdout + r.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
def test_the_console_shows_raysfts_lines_once_and_a_progress_bar_in_a_terminal(tmp_path, tiny_model_dir, terminal):
    cfg = run_config(tmp_path, tiny_model_dir, "console", shared_prepared=False,  # a first run: prepare too
                     train={"max_steps": 6, "log_every_steps": 3})
    text = console_of(f"raysft train {tmp_path / 'console.yaml'}", tmp_path, terminal)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colour resets (Ray's, at exit) show as nothing
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    ours = [ln for ln in lines if not re.match(r"^(train|prepare train):\s+\d+%\|", ln)]
    if terminal:
        ours = ours[1:-1]  # script's own first and last lines
    noise = [ln for ln in ours if re.search(r"RayTrainWorker|TrainController|Reporting training result|INFO|"
                                            r"WARNING|Warning|zero_to_fp32|Loading checkpoint", ln)]
    assert noise == []
    assert len(ours) == len(set(ours)), [ln for ln in ours if ours.count(ln) > 1]  # every line once
    assert ours[0].startswith("prepare: chat template chatml checked on 64 records (masks, end of turn <|im_end|> "
                              "trained")  # the template checked before Ray starts
    assert re.fullmatch(r"ray: starting Ray in this process \(\d+ logical CPUs\)", ours[1])
    assert any(ln.startswith("setup: 0.12M parameters") for ln in ours)
    assert sum(ln.startswith("checkpoint: step ") for ln in ours) == 3
    assert ours[-3] == f"train: loss curve {cfg.output_dir}/loss.png"  # drawn before the export: its card shows it
    assert re.fullmatch(r"export: consolidating \S+ into a Hugging Face folder", ours[-2]), ours[-2]
    assert re.fullmatch(rf"export: \S+ -> {re.escape(cfg.output_dir)}/final \(model, step 6\)", ours[-1]), ours[-1]
    steps = [ln for ln in ours if ln.startswith("step ")]
    if terminal:  # the steps are a bar with rate and ETA, not lines
        assert steps == [] and re.search(r"train: 100%\|[^|]*\| 6/6 \[[0-9:]+<00:00, +[0-9.]+s?/?(step|s)", text)
    else:
        assert [s.split()[1] for s in steps] == ["1/6", "2/6", "3/6", "4/6", "6/6"]  # logged and checkpointed
        assert "%|" not in text
    assert len(ours) <= 25  # today's console before this: 125 lines
