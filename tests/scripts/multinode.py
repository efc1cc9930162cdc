"""Multi-node on one machine: a head and two worker nodes (separate raylets), one Train worker on each
(every worker needs the node's single `train_slot`), checkpoints on storage both see. Once the step-2
checkpoint is committed, one worker node is killed (its raylet and the worker with it) and a new node
joins; the run must resume from its last checkpoint and finish. Prints one JSON line for the test.

    python tests/scripts/multinode.py OUTPUT_DIR MODEL_DIR TRAIN_JSONL [fixed | elastic | fixed,elastic]

`json` (first in the list) prepares the same records written as a JSON array on the three nodes, and trains nothing.

With `elastic`, `cluster.num_workers` is [1, 2] and no node replaces the killed one: Ray Train's elastic mode
restarts the group with the one worker that fits, which converts the 2-worker ZeRO checkpoint to DeepSpeed's
universal form and continues. `fixed,elastic` runs both on one cluster, one after the other (the elastic run on the
two worker nodes the fixed run left), each in OUTPUT_DIR-MODE.
"""

import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster


def overrides(out: str, model_dir: str, data: str, mode: str = "fixed") -> list[str]:
    """The run's config (also what the test prepares on one node to compare the rows with)."""
    return [
        f"output_dir={out}", f"data.train_files={data}", "data.max_seq_len=256", f"model.name_or_path={model_dir}",
        "model.from_scratch=true", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=10",
        "train.dtype=fp32", "train.lr=1e-3", "train.log_every_steps=1", "checkpoint.every_steps=2",
        "cluster.num_workers=" + ("[1, 2]" if mode == "elastic" else "2"), "cluster.max_failures=2",
        "cluster.resources_per_worker={CPU: 1, train_slot: 1}", "train.zero_stage=2"]


def run(cluster, workers: list, out: str, model_dir: str, data: str, mode: str) -> dict:
    """One run on `cluster`; its worker nodes `workers` (one is killed, and in fixed mode replaced: the list then
    holds the nodes alive after it). The report the test reads."""
    from raysft import checkpoint as ckpt
    from raysft.config import load_config
    from raysft.train.launch import train

    cfg = load_config(None, overrides(out, model_dir, data, mode))
    result, errors = {}, []

    def go():
        try:
            result.update(train(None, [], cfg=cfg, log=print))
        except BaseException as exc:  # reported to the test below
            errors.append(repr(exc))

    thread = threading.Thread(target=go)
    thread.start()
    step2 = os.path.join(cfg.checkpoint.storage_path, cfg.run_name, ckpt.dir_name(2))
    deadline = time.time() + 300
    while ckpt.verify(step2, checksums=False) is not None and time.time() < deadline and thread.is_alive():
        time.sleep(0.5)
    per_node = ray._private.state.available_resources_per_node()
    # a node whose only train_slot is taken lists none available (Ray leaves out resources at zero)
    slots_in_use = sorted(n.node_id for n in workers if n.node_id in per_node
                          and per_node[n.node_id].get("train_slot", 0) == 0)
    all_nodes = sorted(n.node_id for n in workers)
    victim = workers[-1]
    cluster.remove_node(victim, allow_graceful=False)  # kills its raylet and the Train worker on it
    workers.remove(victim)
    if mode != "elastic":
        workers.append(cluster.add_node(num_cpus=1, resources={"train_slot": 1}))
    thread.join(timeout=600)
    return {"mode": mode, "worker_nodes_busy": slots_in_use, "all_worker_nodes": all_nodes, "killed": victim.node_id,
            "result": result, "errors": errors}


def prepare_json(out: str, model_dir: str, data: str) -> dict:
    """The run's data as a JSON array (indent=2, as published sets are), prepared on the cluster: the report holds
    its prepared folder and which nodes prepared how many chunks."""
    from raysft.config import load_config
    from raysft.prepare import prepare

    os.makedirs(out, exist_ok=True)
    array = os.path.join(out, "data.json")
    with open(data, encoding="utf-8") as f, open(array, "w", encoding="utf-8") as g:
        json.dump([json.loads(line) for line in f if line.strip()], g, indent=2, ensure_ascii=False)
    path, manifest = prepare(load_config(None, overrides(out, model_dir, array)), log=print)
    return {"mode": "json", "prepared": path, "prepare_nodes": manifest["prepare_nodes"],
            "records_kept": manifest["records_kept"]}


def main(out: str, model_dir: str, data: str, modes: str = "fixed") -> None:
    """`modes`: fixed, elastic, or fixed,elastic (one after the other on the same cluster, OUTPUT_DIR-MODE each)."""
    # the GCS marks a killed node dead after a few missed health checks (Ray's defaults: 5 missed, 3 s apart); a
    # faster check makes this test wait less, not Ray Train behave otherwise
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": {
        "health_check_initial_delay_ms": 1000, "health_check_period_ms": 500, "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=1, resources={"train_slot": 1}) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR")
    several = "," in modes
    for mode in modes.split(","):
        where = f"{out}-{mode}" if several else out
        report = prepare_json(where, model_dir, data) if mode == "json" else run(cluster, workers, where, model_dir,
                                                                                  data, mode)
        print("MULTINODE " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
