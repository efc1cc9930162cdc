"""What a user sees of training: one grep-friendly line per logged step, metrics.jsonl, TensorBoard, a loss PNG."""

from __future__ import annotations

import json
import os


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


class MetricsWriter:
    """Rank 0's metrics: appended to {output_dir}/metrics.jsonl and TensorBoard events in {output_dir}/tensorboard."""

    def __init__(self, output_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, m: dict) -> None:
        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        for k, v in m.items():
            if k not in ("step", "total_steps", "time") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, m["step"])
        self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def read_metrics(output_dir: str) -> list[dict]:
    """Logged steps in order, the last record of each step winning (a resumed run logs some steps twice)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    by_step = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = json.loads(line)
                by_step[m["step"]] = m
    return [by_step[k] for k in sorted(by_step)]


def loss_figure(ms: list[dict]):
    """Train loss per logged step, and eval loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], label="train loss")
    ev = [m for m in ms if "eval_loss" in m]
    if ev:
        ax.plot([m["step"] for m in ev], [m["eval_loss"] for m in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_loss(output_dir: str) -> str:
    import matplotlib.pyplot as plt

    fig = loss_figure(read_metrics(output_dir))
    path = os.path.join(output_dir, "loss.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
