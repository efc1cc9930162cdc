"""How raysft joins Ray: connect to `cluster.address`, or start Ray in this process.

An in-process Ray keeps Ray 2.60's default of token authentication on (Ray makes ~/.ray/auth_token when
`RAY_AUTH_MODE` is unset; a user's explicit `RAY_AUTH_MODE` is respected), its
dashboard on 127.0.0.1 only, and enough logical CPUs for the Train workers *and* the Ray Data tasks that
feed them (with too few, the data tasks wait for CPUs the workers hold and the run deadlocks).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from raysft import storage
from raysft.config import Config, worker_range


def logical_cpus(cfg: Config) -> int:
    per_worker = int(cfg.cluster.resources_per_worker.get("CPU", 1))
    return cfg.cluster.num_cpus or max(os.cpu_count() or 1, worker_range(cfg.cluster)[1] * per_worker + 2)


def in_process(cfg: Config) -> bool:
    """Whether `ensure_ray` will start Ray in this process (no address, none running)."""
    import ray

    return not (ray.is_initialized() or cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def local_cores() -> int:
    """The cores Ray's tasks share when Ray runs in this process (this machine alone: its logical CPUs may be more
    than its cores, to fit Train workers and data tasks), else 0: a cluster's CPUs are its own."""
    import ray

    # private: Ray has no public way to ask whether this process started the node it is connected to
    node = getattr(ray._private.worker, "_global_node", None)
    return (os.cpu_count() or 1) if ray.is_initialized() and node is not None and node.head else 0


def check_machine_fits(cfg: Config) -> None:
    """With Ray started in this process, the Train workers must fit this machine's cores (or cluster.num_cpus, when
    set on purpose): 64 workers on 2 cores start 64 processes that thrash and hang. Checked before Ray starts;
    on a cluster, `launch.check_resources` compares with what the cluster has."""
    from raysft.errors import UserError, format_error

    if not in_process(cfg):
        return
    per_worker = cfg.cluster.resources_per_worker.get("CPU", 1)
    workers = worker_range(cfg.cluster)[1]
    have = max(os.cpu_count() or 1, cfg.cluster.num_cpus)
    if workers * per_worker > have:
        raise UserError(format_error(
            "cluster.num_workers", f"{workers} workers x {per_worker:g} CPU = {workers * per_worker:g} CPUs, but this "
            f"machine has {have} and Ray runs in this process (cluster.address is empty)", cfg.cluster.num_workers,
            f"use at most {int(have // per_worker)} workers here, or join a cluster with enough CPUs "
            "(cluster.address, or RAY_ADDRESS)"))


def ensure_ray(cfg: Config, log=print) -> None:
    """Join `cluster.address` (or RAY_ADDRESS), or start Ray here. Workers' output is forwarded to this console
    only under --verbose: raysft's own lines come through console.log (raysft.console)."""
    import ray

    from raysft.console import quiet_ray, verbose

    if ray.is_initialized():
        return
    quiet_ray()
    own_sigterm = signal.getsignal(signal.SIGTERM)  # raysft's CLI handler, when it installed one
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose())
    else:
        log(f"ray: starting Ray in this process ({logical_cpus(cfg)} logical CPUs)")
        ray.init(num_cpus=logical_cpus(cfg), dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                 include_dashboard=os.environ.get("RAYSFT_DASHBOARD", "1") != "0", log_to_driver=verbose())
    if callable(own_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, own_sigterm)  # ray.init put its own (sys.exit) in its place
    # private: the session's log folder has no public accessor (the dashboard's API needs the dashboard)
    log(f"ray: its logs are in {ray._private.worker._global_node.get_logs_dir_path()}"
        if getattr(ray._private.worker, "_global_node", None) else "ray: logs are on the cluster's nodes")


def auth_line() -> str:
    """How this connection to Ray is authenticated, for the run's log."""
    import ray

    # private: Ray 2.60 exposes no public check of the connection's auth mode
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    address = ray.get_runtime_context().gcs_address
    if is_token_auth_enabled():
        return f"ray: {address}, token authentication on"
    return (f"ray: {address}, token authentication OFF (RAY_AUTH_MODE=disabled): anyone who reaches the cluster's "
            "ports can run code on it")


def check_shared_storage(cfg: Config) -> None:
    """Every node that can run a Train worker or a Ray Data task must see `output_dir` (prepared rows, metrics) and
    `checkpoint.storage_path` as the driver does: the driver writes a marker file in each, and a zero-CPU task pinned
    to each node looks for it. A folder local to the head node fails here, naming the node, before any data task or
    Train worker starts (URIs such as s3:// are shared by nature and not checked)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raysft.errors import UserError, format_error

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]
    if all(n["NodeID"] == here for n in nodes):
        return  # Ray runs on this machine only
    paths = {"output_dir": cfg.output_dir, "checkpoint.storage_path": cfg.checkpoint.storage_path}
    if not cfg.data.prepared_path.startswith(os.path.join(cfg.output_dir, "")):  # its own place: checked too
        paths["data.prepared_path"] = cfg.data.prepared_path
    paths = {k: v for k, v in paths.items() if not storage.is_uri(v)}
    token = uuid.uuid4().hex
    markers = {}
    for key, path in paths.items():
        os.makedirs(path, exist_ok=True)
        markers[key] = os.path.join(path, f".raysft-shared-check-{token}")
        with open(markers[key], "w") as f:
            f.write(token)

    @ray.remote(num_cpus=0)
    def sees(files: dict) -> dict:
        def read(path):
            try:
                with open(path) as f:
                    return f.read()
            except OSError:
                return ""

        return {key: read(path) == token for key, path in files.items()}

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(markers) for n in nodes], timeout=120)
    finally:
        for path in markers.values():
            os.remove(path)
    for key, path in paths.items():
        blind = [n for n, s in zip(nodes, seen) if not s[key]]
        if blind:
            names = ", ".join(f"{n['NodeManagerAddress']} (id {n['NodeID'][:8]})" for n in blind)
            raise UserError(format_error(
                key, f"not shared with every node: {len(blind)} of {len(nodes)} nodes ({names}) do not see what the "
                "driver writes there", path,
                "put output_dir, checkpoint.storage_path and data.prepared_path on storage every node mounts at the "
                "same path (NFS, a ReadWriteMany volume); checkpoint.storage_path may also be s3:// or gs://"))
