"""What both workers (deepspeed and hf) do the same way: per-step metrics, evaluation, checkpoint packaging
and commit, and the test-only fault switches. Runs inside Ray Train workers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

# bf16 dense peak FLOP/s by GPU name, for MFU
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
                 "B200": 2250e12}


def setup(job: dict, trainer_checkpoints_activations: bool = False):
    """What both workers start with: config, rank and world, rank-0 log, tokenizer, rows, schedule, and the model
    (seeded, LoRA applied); returned as a namespace. Sets DS_ACCELERATOR before anything imports DeepSpeed.
    `train.gradient_checkpointing` is turned on here, unless the Trainer turns it on itself."""
    from types import SimpleNamespace

    import ray.train

    from raysft.config import from_dict
    from raysft.modeling import apply_lora, build_model, parameter_counts
    from raysft.train.rows import PreparedRows
    from raysft.train.schedule import Schedule

    cfg = from_dict(job["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.cluster.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    from transformers import AutoTokenizer

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(job["prepared"], "tokenizer"))
    rows = PreparedRows(job["prepared"])
    torch.manual_seed(t.seed)
    model = build_model(cfg.model.name_or_path, len(tokenizer), from_scratch=cfg.model.from_scratch, seed=t.seed,
                        dtype=t.dtype, attn_implementation=cfg.model.attn_implementation,
                        trust_remote_code=cfg.model.trust_remote_code,
                        gradient_checkpointing=t.gradient_checkpointing and not trainer_checkpoints_activations)
    model = apply_lora(model, t.lora, vocab_grew=job.get("vocab_grew", False))
    return SimpleNamespace(
        cfg=cfg, t=t, c=cfg.cluster, rank=rank, world=world, log=log, tokenizer=tokenizer, rows=rows,
        eval_rows=PreparedRows(job["prepared"], "eval") if job.get("has_eval") else None,
        schedule=Schedule(len(rows), t.global_batch_size, t.seed, t.epochs, t.max_steps), model=model,
        counts=parameter_counts(model), run_dir=os.path.join(cfg.checkpoint.storage_path, cfg.run_name))


def lr_scheduler_name(name: str) -> str:
    """train.lr_scheduler as transformers names it (its "constant" ignores warmup)."""
    return "constant_with_warmup" if name == "constant" else name


def checkpoint_state(w, job: dict, steps, step: int, backend: str) -> dict:
    """The state.json of a checkpoint at `step` (the contract in raysft/checkpoint.py), for either backend."""
    t, schedule = w.t, w.schedule
    return {"step": step, "epoch": schedule.epoch_of(max(step - 1, 0)), "samples_seen": steps.samples_seen,
            "tokens_seen": steps.tokens_seen, "seed": t.seed, "fingerprint": job["fingerprint"],
            "world_size": w.world, "backend": backend, "zero_stage": t.zero_stage, "lora": bool(t.lora.r),
            "total_steps": schedule.total_steps, "global_batch_size": t.global_batch_size,
            "final": step == schedule.total_steps}


def gpu_peak(use_gpu: bool):
    import torch

    if not use_gpu:
        return None
    return next((v for k, v in GPU_PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)


def setup_line(n_params: int, n_trainable: int, lora_r: int, rows: int, schedule, world: int, micro: int,
               accumulation: int, zero_stage: int, dtype: str, backend: str) -> str:
    """The line rank 0 prints before the first step."""
    return (f"setup: {n_params / 1e6:.2f}M parameters, {n_trainable:,} trainable ({n_trainable / n_params:.2%}"
            f"{', LoRA r=' + str(lora_r) if lora_r else ''}), {rows} rows, {schedule.steps_per_epoch} steps/epoch, "
            f"{schedule.total_steps} steps, {world} workers x {micro} rows x {accumulation} accumulation = "
            f"{world * micro * accumulation} rows/step, ZeRO-{zero_stage}, {dtype}, backend {backend}")


class StepMetrics:
    """Turns one optimizer step's sums (already reduced over ranks) into the metrics dict both workers log."""

    def __init__(self, schedule, rows, world: int, n_params: int, model_config, peak, start_step: int,
                 samples_seen: int, tokens_seen: int):
        self.schedule, self.rows, self.world, self.n_params = schedule, rows, world, n_params
        self.layers, self.hidden = model_config.num_hidden_layers, model_config.hidden_size
        self.peak, self.resumed_from = peak, start_step
        self.samples_seen, self.tokens_seen = samples_seen, tokens_seen
        self.t_start, self.steps_timed = time.time(), 0

    def __call__(self, step: int, loss: float, processed: float, data_time: float, step_time: float, lr: float,
                 grad_norm: float) -> dict:
        global_rows = self.schedule.global_batch(step - 1)
        real_tokens = int(self.rows.num_tokens[global_rows].sum())
        self.samples_seen += len(global_rows)
        self.tokens_seen += real_tokens
        self.steps_timed += 1
        m = {"step": step, "total_steps": self.schedule.total_steps, "epoch": self.schedule.epoch_of(step - 1),
             "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": real_tokens / step_time,
             "padding_fraction": 1 - real_tokens / processed, "data_wait": data_time / self.world / step_time,
             "step_time": step_time,
             "eta_s": (time.time() - self.t_start) / self.steps_timed * (self.schedule.total_steps - step),
             "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen, "resumed_from": self.resumed_from,
             "time": time.time()}
        if self.peak:
            flops_per_token = 6 * self.n_params + 6 * self.layers * self.hidden * processed / len(global_rows)
            m["mfu"] = real_tokens / step_time * flops_per_token / (self.peak * self.world)
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}. fix: lower train.lr, or use bf16/fp32")
        return m


class ReportGate:
    """When a metrics-only `ray.train.report` may go out without stalling training.

    Ray Train 2.60 hands each report to the controller through a queue of size one that the controller drains once
    per health check (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s): a second report within that interval blocks the
    worker until the first is collected (measured: 40 tiny steps logged every step took 107 s, every 20 steps 31 s).
    Rank 0's clock decides; the decision rides on the per-step all-reduce the workers do anyway (`vote()` is summed
    over ranks), so every rank makes the same number of report calls, which Ray Train requires.
    Checkpoint reports are never skipped.
    """

    def __init__(self, rank: int):
        self.rank, self.last = rank, 0.0
        self.interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))

    def vote(self) -> float:
        return float(self.rank == 0 and time.time() - self.last >= self.interval)

    def report(self, metrics: dict, votes: float) -> None:
        import ray.train

        if votes > 0:
            ray.train.report(metrics)
            self.last = time.time()


def trained_tokens(rows, schedule, step: int) -> int:
    """Trained tokens in global step `step` (1-based): the loss's denominator, known to every rank."""
    return int(rows.num_trained[schedule.global_batch(step - 1)].sum())


def eval_batches(num_rows: int, rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's eval micro-batches: rows dealt round-robin; every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), a rank short of rows repeating row 0 with weight 0 (id -1)."""
    mine = list(range(rank, num_rows, world))
    per_rank = -(-num_rows // world)
    mine += [-1] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def evaluate(forward, eval_rows, rank: int, world: int, micro_batch_size: int, pad_id: int, device) -> dict:
    """Eval loss (mean over every trained token of the eval rows, all ranks) and perplexity.

    `forward(batch) -> logits`. The model is put in eval mode by the caller.
    """
    import torch
    import torch.distributed as dist

    from raysft.modeling import collate, token_loss_sum

    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for micro in eval_batches(len(eval_rows), rank, world, micro_batch_size):
            batch = collate(eval_rows.get([max(i, 0) for i in micro]), pad_id, device)
            keep = torch.tensor([i >= 0 for i in micro], device=device)
            batch["labels"][~keep] = -100  # filler rows count for nothing
            logits = forward(batch)
            sums[0] += token_loss_sum(logits, batch["labels"]).double()
            sums[1] += (batch["labels"][:, 1:] != -100).sum()
    dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(sums[1].item())}


def eval_and_log(m: dict, w, forward, engine, device, start_step: int, writer) -> bool:
    """After a step: eval when due (adds eval_loss/eval_ppl to `m`), then the step line and metrics.jsonl when due.
    Returns whether a checkpoint is due at this step."""
    from raysft.train.metrics import step_line

    t, step = w.t, m["step"]
    if w.eval_rows is not None and due(step, w.schedule.total_steps, t.eval_every_steps):
        engine.eval()
        m.update(evaluate(forward, w.eval_rows, w.rank, w.world, t.micro_batch_size, w.tokenizer.pad_token_id,
                          device))
        engine.train()
    checkpoint = due(step, w.schedule.total_steps, w.cfg.checkpoint.every_steps)
    if step % t.log_every_steps == 0 or checkpoint or step == start_step + 1 or "eval_loss" in m:
        w.log(step_line(m))
        if writer:
            writer.write(m)
    return checkpoint


def due(step: int, total_steps: int, every: int) -> bool:
    """Checkpoints and evals: every `every` steps (0 = never) and at the last step."""
    return step == total_steps or bool(every and step % every == 0)


def write_run_files(local: str, cfg, job: dict, state: dict) -> None:
    """Rank 0's part of a checkpoint besides the model: state.json, the resolved config, the tokenizer."""
    from raysft import checkpoint as ckpt
    from raysft.config import to_yaml

    with open(os.path.join(local, ckpt.STATE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(local, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    shutil.copytree(os.path.join(job["prepared"], "tokenizer"), os.path.join(local, "tokenizer"))


def report_checkpoint(local: str, step: int, metrics: dict, w, job: dict, gate: "ReportGate") -> None:
    """Every rank: list its files and report its folder. Rank 0: once Ray has committed every rank's files,
    check them and write the manifest (only then is it a checkpoint), and prune older ones. The report counts for
    `gate`: the next metrics-only report waits its interval."""
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    from raysft import checkpoint as ckpt

    ckpt.write_rank_files(local, w.rank)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(local), checkpoint_dir_name=ckpt.dir_name(step))
    gate.last = time.time()
    pause_in_checkpoint(job, w.cfg, step, w.rank)  # tests: every rank's files are in storage, the manifest is not
    if w.rank == 0:
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        path = next(r.checkpoint.path for r in reported if r.checkpoint.path.endswith(ckpt.dir_name(step)))
        ckpt.commit(path, w.world)
        w.log(f"checkpoint: step {step} committed at {path}")
        ckpt.prune(w.run_dir, w.cfg.checkpoint.keep, w.log)
    shutil.rmtree(local, ignore_errors=True)


def pause_in_checkpoint(job: dict, cfg, step: int, rank: int) -> None:
    """Tests only (launch.PAUSE_IN_CHECKPOINT_STEP): hold still until killed (pid in a marker), after the ranks
    uploaded their files and before rank 0 has verified them and written the manifest: a checkpoint that Ray has
    but raysft must never use."""
    if job.get("pause_in_checkpoint_step") == step and rank == job.get("fail_rank", 0):
        marker = os.path.join(cfg.output_dir, f".paused-in-checkpoint-step{step}")
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(300)


def maybe_fail(job: dict, cfg, step: int, rank: int) -> None:
    """Tests only (launch.FAIL_AFTER_STEP): raise after `step`, once per run (the resumed attempt goes through)."""
    if job.get("fail_after_step", 0) == step and rank == job.get("fail_rank", 0):
        marker = os.path.join(cfg.output_dir, f".injected-failure-step{step}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError(f"raysft test: injected failure after step {step}")


def probe(forward, rows, device) -> dict:
    """Logits of a fixed input (the first row's first 64 tokens), so that export can be checked against the
    trained model."""
    import torch

    ids = torch.tensor([rows.get([0])["input_ids"][0][:64]], device=device)
    with torch.no_grad():
        logits = forward({"input_ids": ids, "position_ids": torch.arange(ids.shape[1], device=device)[None]})
    return {"input_ids": ids.cpu(), "logits": logits.float().cpu()}
