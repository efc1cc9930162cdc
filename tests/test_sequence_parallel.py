"""Sequence parallelism (raysft/train/sequence_parallel.py, DeepSpeed's Ulysses pieces) on CPU with gloo: two
processes without Ray compare SP=2 with one process on the same rows; Ray runs compare whole training runs."""

from __future__ import annotations

import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What tests/sp_parts.measure saw on 2 gloo processes."""
    import sp_parts
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("sp") / "result.pt")
    mp.start_processes(sp_parts.measure, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    return torch.load(out)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("tag", ["sp", "sp_tiled", "sp_tiled_offload"])
def test_sp2_gives_the_loss_and_every_gradient_of_one_process_within_1e_5(two_ranks, tag):
    r = two_ranks
    assert r[f"slices_{tag}"] == 4  # 2 scheduled rows per rank... each a slice of its group's 2 rows
    assert abs(r[f"loss_{tag}"] - r["loss_ref"]) <= 1e-5 * r["loss_ref"]
    ref, got = r["grads_ref"], r[f"grads_{tag}"]
    assert ref.keys() == got.keys() and all(close(got[k], ref[k]) for k in ref), \
        max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert all(ref[k].abs().sum() > 0 for k in ref)  # every parameter has a gradient to compare


def test_activation_offload_moves_each_checkpointed_layers_input_to_cpu_memory(two_ranks):
    # sp_tiled_offload's gradients are checked above; here: each layer of each of a rank's 4 slices was
    # checkpointed, and its input, a [1, slice, hidden] tensor, went through save_on_cpu
    import sp_parts

    assert two_ranks["checkpoint_calls"] == 2 * 4
    lengths = [len(r["input_ids"][0]) for r in sp_parts.rows()]
    slices = {max(lengths[k], lengths[k + 1]) // 2 for k in (0, 2)}  # rows k and k+1, padded to the longer, halved
    inputs = sorted({s[1] for s in two_ranks["offloaded"] if len(s) == 3 and s[0] == 1 and s[2] == 64})
    assert slices <= set(inputs), (slices, inputs)


def test_a_packed_rows_logits_under_sp_equal_each_examples_alone(two_ranks):
    assert two_ranks["logits_sp"].shape == two_ranks["logits_alone"].shape
    assert close(two_ranks["logits_sp"], two_ranks["logits_alone"])


def test_tiled_mlp_runs_equal_tiles_on_every_slice(two_ranks):
    # 3 tiles asked; rank 0's slices are 32 tokens (rows 0 and 1) and 25 (rows 2 and 3, the longer of 50 and 48,
    # halved): padded to 33 and 27, 3 tiles of 11 and of 9, in forward and again in backward, for 4 slices
    assert two_ranks["tiled"] == 2  # one MLP per decoder layer
    assert sorted(two_ranks["tiles"]) == [9] * 12 + [11] * 12


def test_eval_after_sp_steps_uses_the_models_own_attention(two_ranks):
    # the model has 1 key/value head, which Ulysses replicates over the 2 ranks (rewriting the layers' head
    # groups): outside training the whole row goes through the model's own kernel with its own groups
    assert close(two_ranks["logits_row_after"], two_ranks["logits_row"])


def test_the_sdpa_mask_keeps_packed_examples_and_sliding_windows():
    from raysft.train.sequence_parallel import block_causal_mask

    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    doc = (pos == 0).cumsum(1)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    for window in (None, 2, 3):
        expected = (doc[:, :, None] == doc[:, None, :]) & (j <= i) & ((i - j < window) if window else True)
        assert torch.equal(block_causal_mask(pos, window), expected[:, None]), window
    assert block_causal_mask(pos[1:]) is None  # one example, no window: plain causal
    assert block_causal_mask(pos[1:], 4) is not None


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, tiny_model_dir, ray_session):
    """The reference run (conftest: 6 steps, 2 workers, ZeRO-2, checkpoints at 2, 4, 6) with SP=2: one group of 2
    workers, each row split between them. (config, train's result)."""
    from raysft.train.launch import train

    from helpers import run_config

    cfg = run_config(tmp_path_factory.mktemp("sp2"), tiny_model_dir, "sp2", train={"sequence_parallel_size": 2})
    logs = []
    result = train(None, [], cfg=cfg, log=logs.append)
    return cfg, result, logs


def within(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.ray
def test_sp2_trains_the_same_rows_as_sp1_with_losses_and_gradient_norms_within_1e_5(reference, sp_run):
    from raysft.train.metrics import read_metrics

    cfg, _, logs = sp_run
    assert any("sequence parallel: 1 group(s) of 2 workers" in line for line in logs), logs
    sp, ref = read_metrics(cfg.output_dir), read_metrics(reference[0].output_dir)
    assert [m["step"] for m in sp] == [1, 2, 3, 4, 5, 6] and sp[-1]["samples_seen"] == ref[-1]["samples_seen"] == 48
    assert [m["tokens_seen"] for m in sp] == [m["tokens_seen"] for m in ref]
    for a, b in zip(sp, ref):
        assert within(a["loss"], b["loss"]) and within(a["grad_norm"], b["grad_norm"]), (a, b)
    assert sp[-1]["loss"] < sp[0]["loss"]


@pytest.mark.ray
def test_an_sp2_checkpoint_resumes_with_sp1_on_the_next_rows(sp_run, tmp_path, tiny_model_dir):
    import shutil

    from raysft.train.launch import train
    from raysft.train.metrics import read_metrics

    from helpers import run_config

    sp_cfg, _, _ = sp_run
    one = run_config(tmp_path, tiny_model_dir, "sp2")  # the same run, sequence_parallel_size 1
    shutil.copytree(sp_cfg.output_dir, one.output_dir, ignore=shutil.ignore_patterns("final", "checkpoint_00000006"))
    train(None, [], cfg=one, log=lambda s: None)
    ms, sp = read_metrics(one.output_dir), read_metrics(sp_cfg.output_dir)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6] and [m["resumed_from"] for m in ms][4:] == [4, 4]
    assert [m["samples_seen"] for m in ms] == [m["samples_seen"] for m in sp]
    assert [m["tokens_seen"] for m in ms] == [m["tokens_seen"] for m in sp]  # the same rows
    assert all(within(a["loss"], b["loss"]) for a, b in zip(ms[4:], sp[4:])), (ms[4:], sp[4:])


@pytest.mark.ray
def test_a_sigkilled_worker_under_sp_resumes_and_ends_bit_identical(sp_run, tmp_path, tiny_model_dir):
    import os
    import signal

    import psutil

    from raysft import checkpoint as ckpt
    from raysft.train.metrics import read_metrics

    from helpers import assert_same_as_reference, run_config, train_in_thread, wait_for

    sp_cfg, result, _ = sp_run
    cfg = run_config(tmp_path, tiny_model_dir, "sp2kill", train={"sequence_parallel_size": 2},
                     cluster={"max_failures": 2})
    step2 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(2))
    thread, outcome = train_in_thread(cfg)
    wait_for(lambda: ckpt.verify(step2, checksums=False) is None, thread)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert max(m["resumed_from"] for m in read_metrics(cfg.output_dir)) in (2, 4)
    assert_same_as_reference((sp_cfg, result), cfg, outcome["result"])

