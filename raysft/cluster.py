"""How raysft joins Ray: connect to `cluster.address`, or start Ray in this process.

An in-process Ray keeps Ray 2.60's default of token authentication on (Ray makes ~/.ray/auth_token when
`RAY_AUTH_MODE` is unset; a user's explicit `RAY_AUTH_MODE` is respected), its
dashboard on 127.0.0.1 only, and enough logical CPUs for the Train workers *and* the Ray Data tasks that
feed them (with too few, the data tasks wait for CPUs the workers hold and the run deadlocks).
"""

from __future__ import annotations

import logging
import os

from raysft.config import Config, worker_range


def logical_cpus(cfg: Config) -> int:
    per_worker = int(cfg.cluster.resources_per_worker.get("CPU", 1))
    return cfg.cluster.num_cpus or max(os.cpu_count() or 1, worker_range(cfg.cluster)[1] * per_worker + 2)


def ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    ray.init(num_cpus=logical_cpus(cfg), dashboard_host="127.0.0.1", logging_level=logging.WARNING,
             include_dashboard=os.environ.get("RAYSFT_DASHBOARD", "1") != "0")
