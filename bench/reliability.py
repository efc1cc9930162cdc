"""What a fault costs: time to resume and steps lost, for a Train worker SIGKILLed mid-run and for the driver
killed and the same command run again, on both backends, against an uninterrupted run of the same config.

    python bench/reliability.py [--backend deepspeed|hf|both] [--steps 60] [--every 10] [--kill-after 25]

Each scenario runs `raysft train` as a user would (a subprocess, Ray started in-process), on the quickstart
model and data, 2 workers, CPU, fp32, a checkpoint every `--every` steps. The bench watches metrics.jsonl and
reads when each step was logged (metrics.jsonl's `time`). After step `--kill-after` it kills the target:
- worker: SIGKILL of one RayTrainWorker process (found by its process title); Ray Train restarts the group
  (cluster.max_failures=2) from the last committed checkpoint.
- driver: SIGKILL of the whole `raysft train` process group (its in-process Ray too), then the same command again.

Printed per scenario: the last step logged before the kill, the newest checkpoint committed before it, the step
the run resumed from, steps re-trained (last logged - resumed from), steps lost beyond the last checkpoint
(checkpoint - resumed from: the goal is 0), seconds from the kill to the first step after the resume, and, as the
peer, seconds from a fresh start to its first step (the uninterrupted run) -- their ratio says what resuming costs
over starting. Finally whether per-step losses and final weights equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def metrics_lines(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def committed_steps(out: str) -> list[int]:
    from raysft import checkpoint as ckpt

    return sorted(step for step, path in ckpt.list_checkpoints(os.path.join(out, "ray", "run"))
                  if ckpt.verify(path, checksums=False) is None)


class Run:
    """`raysft train` in its own process group, its metrics.jsonl watched: wall time at which each line appeared."""

    def __init__(self, out: str, overrides: list[str]):
        self.out, self.overrides, self.seen = out, overrides, []  # (time, metrics)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RAYSFT_DASHBOARD", "0")
        self.t_start = time.time()
        self.proc = subprocess.Popen(["raysft", "train", os.path.join(ROOT, "configs", "quickstart.yaml"),
                                      f"output_dir={self.out}", "run_name=run", *self.overrides], cwd=ROOT, env=env,
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def poll(self) -> None:
        lines = metrics_lines(self.out)
        now = time.time()
        for m in lines[len(self.seen):]:
            self.seen.append((now, m))

    def wait_until(self, predicate, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while not predicate():
            self.poll()
            if self.proc.poll() is not None and not predicate():
                raise RuntimeError(f"raysft train exited ({self.proc.returncode}) before the moment to kill")
            if time.time() > deadline:
                raise TimeoutError("no progress")
            time.sleep(0.05)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=900)
        self.poll()
        return rc

    def last_step(self) -> int:
        return self.seen[-1][1]["step"] if self.seen else 0


def losses(out: str) -> list[float]:
    from raysft.train.metrics import read_metrics

    return [m["loss"] for m in read_metrics(out)]


def same_weights(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "final", "model.safetensors")), load_file(os.path.join(b, "final",
                                                                                                "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def scenario(kind: str, work: str, overrides: list[str], kill_after: int) -> dict:
    import psutil

    out = os.path.join(work, kind)
    run = Run(out, overrides + ["cluster.max_failures=2"])
    run.start()
    run.wait_until(lambda: run.last_step() >= kill_after)
    before = run.last_step()
    checkpoint = max([s for s in committed_steps(out) if s <= before] or [0])
    t_kill = time.time()
    if kind == "worker":
        victims = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
        os.kill(victims[-1].pid, signal.SIGKILL)
    else:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        run.start()
    rc = run.finish()
    lines = metrics_lines(out)
    after = [m for m in lines if m["time"] > t_kill and m["resumed_from"] > 0]
    if rc != 0 or not after:
        raise RuntimeError(f"{kind} scenario: exit status {rc}, {len(after)} steps logged after the resume ({out})")
    # the first attempt's workers can outlive a killed driver for a few seconds (and even commit a checkpoint)
    reached = max(m["step"] for m in lines if m["resumed_from"] == 0)
    first = after[0]
    return {"kind": kind, "rc": rc, "step_at_kill": before, "checkpoint_at_kill": checkpoint,
            "first_attempt_reached": reached, "resumed_from": first["resumed_from"],
            "steps_retrained": reached - first["resumed_from"],
            "steps_lost_beyond_checkpoint": max(0, checkpoint - first["resumed_from"]),
            "seconds_to_resume": round(first["time"] - t_kill, 1), "out": out}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="both", choices=["deepspeed", "hf", "both"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=25)
    args = parser.parse_args()
    backends = ["deepspeed", "hf"] if args.backend == "both" else [args.backend]
    for backend in backends:
        work = tempfile.mkdtemp(prefix=f"raysft-reliability-{backend}-")
        overrides = [f"train.backend={backend}", f"train.max_steps={args.steps}",
                     f"checkpoint.every_steps={args.every}", "train.log_every_steps=1"]
        ref = Run(os.path.join(work, "reference"), overrides)
        ref.start()
        assert ref.finish() == 0
        fresh_start = round(metrics_lines(ref.out)[0]["time"] - ref.t_start, 1)
        print(f"== backend {backend}: {args.steps} steps, checkpoint every {args.every}, kill after step "
              f"{args.kill_after}; uninterrupted run: first step logged {fresh_start}s after start", flush=True)
        for kind in ("worker", "driver"):
            r = scenario(kind, work, overrides, args.kill_after)
            r["same_losses"] = losses(r["out"]) == losses(ref.out)
            r["same_weights"] = same_weights(r["out"], ref.out)
            r["resume_vs_fresh_start"] = round(r["seconds_to_resume"] / fresh_start, 2)
            print(json.dumps({k: v for k, v in r.items() if k != "out"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
