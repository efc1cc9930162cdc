"""Preemption on a real cluster of `ray start --block` nodes on one machine (a head and worker nodes, each worker
node with one `train_slot`; token authentication on, as Ray's default). For each (backend, way):

- the uninterrupted run of the config (the reference);
- the same run, its rank-1 worker's node preempted after step 2: `drain` drains it as a cloud's spot notice does
  (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 8`), `sigterm` sends SIGTERM
  to its `ray start --block` as KubeRay does to a reclaimed pod (the node drains itself for
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=8). The workers see the notice at step 3, checkpoint there (the periodic
  checkpoints are every 5 steps) and train on; the preempted worker then holds still after step 4 until its node
  is gone (the deadline passes, Ray Train stops the workers and restarts them on a spare node), so the run
  resumes from the notice's checkpoint, counted as a preemption (cluster.max_failures is 0: a failure would end it).

Prints one `PREEMPT {json}` line per run pair for the test (tests/test_cluster.py):

    python tests/scripts/preempt.py OUTPUT_DIR MODEL_DIR TRAIN_JSONL deepspeed:drain,fsdp:sigterm
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: faults

DEADLINE_S = 8


def overrides(out: str, model_dir: str, data: str, backend: str, max_failures: int = 0) -> list[str]:
    return [
        f"output_dir={out}", f"data.train_files={data}", "data.max_seq_len=256", f"model.name_or_path={model_dir}",
        "model.from_scratch=true", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=8",
        "train.dtype=fp32", "train.lr=1e-3", "train.log_every_steps=1", "checkpoint.every_steps=5",
        f"train.backend={backend}", "train.zero_stage=2", "cluster.num_workers=2", f"cluster.max_failures={max_failures}",
        "cluster.resources_per_worker={CPU: 1, train_slot: 1}",  # on the Ray this script joined
        f"data.prepared_path={os.path.dirname(out)}/prepared"]


class Nodes:
    """`ray start --block` processes: the head, and worker nodes added as the runs need them."""

    def __init__(self, env: dict):
        import runpy

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        free_port = runpy.run_path(os.path.join(root, "scripts", "free_port.py"))["free_port"]
        self.env, self.gcs, self.temp = env, free_port(), tempfile.mkdtemp(prefix="raysft-ray-")
        self.procs: dict = {}
        self.start("head", ["--head", f"--port={self.gcs}", "--num-cpus=2", f"--temp-dir={self.temp}",
                            "--include-dashboard=false",
                            '--system-config={"health_check_period_ms": 500, "health_check_failure_threshold": 3}'])

    def start(self, name: str, args: list, extra_env: dict | None = None) -> None:
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args]
        with open(os.path.join(self.temp, f"{name}.log"), "w") as log:  # `ray start`'s own lines, for a failure
            self.procs[name] = subprocess.Popen(cmd, env={**self.env, **(extra_env or {})}, start_new_session=True,
                                                stdout=log, stderr=subprocess.STDOUT)

    def worker(self, name: str) -> None:
        """A worker node, started once the ones before it are up (raylets starting together on one machine can
        collide starting their object stores)."""
        count = len(self.alive())
        self.start(name, [f"--address=127.0.0.1:{self.gcs}", "--num-cpus=1",
                          f'--resources={{"train_slot": 1, "{name}": 1}}'],
                   {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DEADLINE_S)})
        self.wait(count + 1)

    def alive(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def wait(self, count: int) -> None:
        deadline = time.time() + 120
        while len(self.alive()) != count:
            if time.time() > deadline:
                logs = {f: open(os.path.join(self.temp, f)).read()[-1500:] for f in os.listdir(self.temp)
                        if f.endswith(".log")}
                raise AssertionError(f"the cluster did not reach {count} nodes: {logs}")
            time.sleep(0.5)

    def name_of(self, node_id: str) -> str:
        import ray

        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        return next(k for k in node["Resources"] if k in self.procs)

    def stop(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def train_thread(cfg, hooks=None):
    from raysft.train.launch import train

    outcome: dict = {}

    def go():
        try:
            outcome["result"] = train(None, [], cfg=cfg, log=lambda s: None, hooks=hooks)
        except BaseException as exc:  # reported to the test
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, outcome


def wait_for(predicate, thread, timeout=300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert thread.is_alive() and time.time() < deadline, "the run ended or hung first"
        time.sleep(0.2)


def compare(ref_out: str, out: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from raysft.train.metrics import read_metrics

    a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (ref_out, out))
    metrics = read_metrics(out)
    with open(os.path.join(out, "console.log"), encoding="utf-8") as f:
        console = f.read().splitlines()
    return {"same_losses": [m["loss"] for m in metrics] == [m["loss"] for m in read_metrics(ref_out)],
            "same_weights": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            "steps": [m["step"] for m in metrics], "resumed_from": [m.get("resumed_from", 0) for m in metrics],
            "lines": [ln for ln in console if "preempt" in ln or " failed (" in ln or ln.startswith("resume:")]}


def run_pair(nodes: Nodes, out: str, model_dir: str, data: str, backend: str, way: str, spare: str) -> dict:
    from raysft import checkpoint as ckpt
    from raysft.config import load_config

    from faults import Faults

    ref_cfg = load_config(None, overrides(f"{out}-{backend}-reference", model_dir, data, backend))
    thread, ref = train_thread(ref_cfg)
    thread.join(600)
    # a drained node's restart is Ray's preemption, never a failure (cluster.max_failures 0 would end the run); when
    # `ray start` ends its own drain (SIGTERM) Ray 2.60 may class the node's end as an expected termination instead
    # (its kill and the drain's deadline are the same moment): a failure, which cluster.max_failures: 1 allows
    cfg = load_config(None, overrides(f"{out}-{backend}-{way}", model_dir, data, backend, int(way == "sigterm")))
    os.makedirs(cfg.output_dir, exist_ok=True)
    hooks = Faults(marker_dir=os.path.abspath(cfg.output_dir), rank=1, notice_after_step=2, pause_after_step=4)
    thread, outcome = train_thread(cfg, hooks)
    notice = os.path.join(cfg.output_dir, ".notice-node")
    wait_for(lambda: os.path.exists(notice), thread)
    with open(notice) as f:
        node_id = f.read().strip()
    victim = nodes.name_of(node_id)
    nodes.worker(spare)  # a draining node takes no new work: the restart needs another slot
    t0 = time.time()
    if way == "drain":
        subprocess.run(["ray", "drain-node", "--address", f"127.0.0.1:{nodes.gcs}", "--node-id", node_id, "--reason",
                        "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "raysft test: spot reclaim",
                        "--deadline-remaining-seconds", str(DEADLINE_S)], env=nodes.env, check=True,
                       capture_output=True)
    else:
        os.kill(nodes.procs[victim].pid, signal.SIGTERM)  # to `ray start` itself, as KubeRay's pod termination
    time.sleep(2)  # Ray Train's watcher polls the drain table every 0.5 s here (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S)
    open(os.path.join(cfg.output_dir, ".drained"), "w").close()
    step3 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(3))
    wait_for(lambda: ckpt.verify(step3, checksums=False) is None, thread)
    saved_after_s = time.time() - t0
    time.sleep(max(0.0, DEADLINE_S + 1 - (time.time() - t0)))
    if way == "drain":  # the reclaim itself, after the deadline (Ray Train has stopped the worker on it by then)
        os.killpg(nodes.procs[victim].pid, signal.SIGKILL)
    thread.join(600)
    report = {"backend": backend, "way": way, "errors": [x["error"] for x in (ref, outcome) if "error" in x],
              "notice_checkpoint_after_s": round(saved_after_s, 1)}
    if not report["errors"]:
        report.update(compare(ref_cfg.output_dir, cfg.output_dir))
    elif os.path.exists(os.path.join(cfg.output_dir, "console.log")):
        with open(os.path.join(cfg.output_dir, "console.log"), encoding="utf-8") as f:
            report["console"] = f.read().splitlines()[-30:]
    return report


def main(out: str, model_dir: str, data: str, pairs: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", "RAYSFT_PREEMPTION_ASK_S": "0",  # every step: the notice's step is known
                "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"})
    os.environ.update(env)  # before Ray is imported: it reads RAY_AUTH_MODE then
    import ray
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    nodes = Nodes(env)
    try:
        deadline = time.time() + 60
        while True:  # the head's GCS takes a moment to answer
            try:
                ray.init(address=f"127.0.0.1:{nodes.gcs}", logging_level="ERROR")
                break
            except ConnectionError:
                assert time.time() < deadline, "the head node did not come up"
                time.sleep(1)
        nodes.wait(1)
        for name in ("w1", "w2"):
            nodes.worker(name)
        for i, pair in enumerate(pairs.split(",")):
            backend, way = pair.split(":")
            report = run_pair(nodes, out, model_dir, data, backend, way, f"spare{i}")
            print("PREEMPT " + json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        nodes.stop()


if __name__ == "__main__":
    main(*sys.argv[1:5])
