"""What a user sees of training: the setup line, one grep-friendly line per logged step, metrics.jsonl,
TensorBoard, a loss PNG; and the per-step metrics themselves (throughput, padding, data wait, MFU, ETA).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

import numpy as np

# bf16 dense peak FLOP/s by GPU name, for MFU
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
                 "B200": 2250e12}


def gpu_peak(use_gpu: bool) -> Optional[float]:
    """This worker's GPU's peak bf16 FLOP/s, when it is one of GPU_PEAK_BF16's."""
    if not use_gpu:
        return None
    import torch

    return next((v for k, v in GPU_PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)


def setup_line(n_params: int, n_trainable: int, lora_r: int, rows: int, schedule, shape, sharding: str,
               dtype: str, backend: str) -> str:
    """The line rank 0 prints before the first step; `sharding`: e.g. ZeRO-2."""
    return (f"setup: {n_params / 1e6:.2f}M parameters, {n_trainable:,} trainable ({n_trainable / n_params:.2%}"
            f"{', LoRA r=' + str(lora_r) if lora_r else ''}), {rows} rows, {schedule.steps_per_epoch} steps/epoch, "
            f"{schedule.total_steps} steps, {shape.world_size} workers x {shape.micro_batch_size} rows x "
            f"{shape.accumulation} accumulation = {shape.global_batch_size} rows/step, {sharding}, {dtype}, "
            f"backend {backend}")


class StepMetrics:
    """Turns one optimizer step's sums (already reduced over ranks) into the metrics dict every backend logs."""

    def __init__(self, schedule, rows, world: int, n_params: int, model_config, peak: Optional[float],
                 start_step: int = 0, samples_seen: int = 0, tokens_seen: int = 0,
                 seen_by_source: Optional[dict] = None, rank: int = 0):
        self.schedule, self.rows, self.world, self.n_params = schedule, rows, world, n_params
        self.layers, self.hidden = model_config.num_hidden_layers, model_config.hidden_size
        self.peak, self.resumed_from = peak, start_step
        self.samples_seen, self.tokens_seen = samples_seen, tokens_seen
        self.t_start, self.steps_timed = time.time(), 0
        # rows seen per data.sources entry, for state.json, which rank 0 alone writes: continued from the restored
        # checkpoint's counts; only a checkpoint written before it kept them has them rebuilt from the schedule
        self.by_source = None if rank else self._restored_by_source(start_step, seen_by_source or {})

    def _restored_by_source(self, start_step: int, seen: dict) -> np.ndarray:
        names = self.rows.source_names
        if start_step == 0 or set(seen) == set(names):
            return np.array([seen.get(name, 0) for name in names], dtype=np.int64)
        done = [self.schedule.global_batch(s) for s in range(start_step)]
        return np.bincount(self.rows.source[np.concatenate(done)], minlength=len(names))

    def __call__(self, step: int, loss: float, processed: float, data_time: float, step_time: float, lr: float,
                 grad_norm: float) -> dict:
        global_rows = self.schedule.global_batch(step - 1)
        real_tokens = int(self.rows.num_tokens[global_rows].sum())
        self.samples_seen += len(global_rows)
        if self.by_source is not None:
            self.by_source += np.bincount(self.rows.source[global_rows], minlength=len(self.by_source))
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
            # 6N per token for the weights, plus attention's 6 x layers x hidden x (mean context)
            flops_per_token = 6 * self.n_params + 6 * self.layers * self.hidden * processed / len(global_rows)
            m["mfu"] = real_tokens / step_time * flops_per_token / (self.peak * self.world)
            import torch

            m["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30  # this rank's peak since start
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}. fix: lower train.lr, or use bf16/fp32")
        return m

    def seen_by_source(self) -> dict:
        """{source name: rows trained on so far} (data.sources), for state.json; empty on ranks other than 0."""
        if self.by_source is None:
            return {}
        return {name: int(n) for name, n in zip(self.rows.source_names, self.by_source)}


class StepLog:
    """Rank 0's record of steps: every step to metrics.jsonl and TensorBoard; the step line for the steps that are
    logged (every `every` steps, the first step of an attempt, evaluated steps and checkpointed steps)."""

    def __init__(self, rank: int, output_dir: str, every: int, start_step: int, log: Callable[[str], None],
                 tensorboard: bool = True, trackers=None):
        self.every, self.start_step, self.log = every, start_step, log
        self.writer = MetricsWriter(output_dir, start_step, tensorboard) if rank == 0 else None
        self.trackers = trackers  # tracking.Trackers: MLflow, W&B (train.report_to)

    def reportable(self, m: dict) -> bool:
        """Whether step `m` goes to Ray as a metrics-only report (when not checkpointed)."""
        return m["step"] % self.every == 0 or "eval_loss" in m

    def __call__(self, m: dict, checkpointed: bool) -> None:
        if self.writer:
            self.writer.write(m)
        if self.trackers:
            self.trackers.metrics(m)
        if self.reportable(m) or checkpointed or m["step"] == self.start_step + 1:
            self.log(step_line(m))

    def samples(self, step: int, pairs: list) -> None:
        """What the model says to train.eval_prompts at `step`: a console line each, samples.jsonl, TensorBoard."""
        if self.writer:
            self.writer.write_samples(step, pairs)
        if self.trackers:
            self.trackers.samples(step, pairs)
        for prompt, answer in pairs:
            self.log(f"sample step {step}: {prompt!r} -> {answer!r}")

    def close(self) -> None:
        """At the end of training (the tracking runs are marked finished)."""
        if self.writer:
            self.writer.close()
        if self.trackers:
            self.trackers.close(finished=True)


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def step_line(m: dict) -> str:
    """`step 5/60 loss 3.2101 lr 3.00e-03 grad_norm 1.234 tok/s 1234 pad 2.1% data 1.2% step 0.52s eta 0:00:30`."""
    line = (f"step {m['step']}/{m['total_steps']} loss {m['loss']:.4f} lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} "
            f"tok/s {m['tokens_per_s']:.0f} pad {m['padding_fraction']:.1%} data {m['data_wait']:.1%} "
            f"step {m['step_time']:.2f}s")
    if "mfu" in m:
        line += f" mfu {m['mfu']:.1%}"
    if "eval_loss" in m:
        line += f" eval_loss {m['eval_loss']:.4f}"
    return line + f" eta {_eta(m['eta_s'])}"


METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class MetricsWriter:
    """Rank 0's metrics: appended to {output_dir}/metrics.jsonl and (unless `tensorboard` is false) TensorBoard
    events in {output_dir}/tensorboard.
    A run resumed from the checkpoint at `start_step` first drops the rows past it (an attempt that died after
    its last checkpoint logged steps that are trained again), so the file holds every step once."""

    def __init__(self, output_dir: str, start_step: int = 0, tensorboard: bool = True):
        from raysft.storage import write_atomic

        os.makedirs(output_dir, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = os.path.join(output_dir, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
                write_atomic(path, "".join(kept))
        self.jsonl = open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8")
        self.samples_path = os.path.join(output_dir, SAMPLES_FILE)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)

    def write(self, m: dict) -> None:
        from raysft.train.tracking import scalars

        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        if self.tb:
            for tag, v in scalars(m):
                self.tb.add_scalar(tag, v, m["step"])
            self.tb.flush()

    def write_samples(self, step: int, pairs: list) -> None:
        """train.eval_prompts' answers at `step`: samples.jsonl and TensorBoard's text tab."""
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for prompt, answer in pairs:
                f.write(json.dumps({"step": step, "prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
        if self.tb:
            self.tb.add_text("samples", "\n\n".join(f"**{p}**\n\n    {a}" for p, a in pairs), step)
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb:
            self.tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    """Every step's metrics in order (the last record of a step wins, for files written before resumes rewrote
    them)."""
    path = os.path.join(output_dir, METRICS_FILE)
    by_step = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = json.loads(line)
                by_step[m["step"]] = m
    return [by_step[k] for k in sorted(by_step)]


def loss_figure(ms: list[dict], title: str = ""):
    """Train loss at every step (a point each), and eval loss, with markers, where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], ".-", markersize=3, linewidth=0.8, label="train loss")
    ev = [m for m in ms if "eval_loss" in m]
    if ev:
        ax.plot([m["step"] for m in ev], [m["eval_loss"] for m in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over trained tokens)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_loss(output_dir: str, title: str = "") -> str:
    import matplotlib.pyplot as plt

    fig = loss_figure(read_metrics(output_dir), title)
    path = os.path.join(output_dir, "loss.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
