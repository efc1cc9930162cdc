"""Shared fixtures: the byte-level ChatML tokenizer, tiny model folders, and one Ray instance per session."""

from __future__ import annotations

import os
import sys

import pytest

import helpers
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYSFT_DASHBOARD", "0")  # tests do not need the dashboard; it costs a CPU on 2 cores
# A hub token in the environment of the driver and of every Ray worker (set before Ray starts): no file of a run
# may contain it (tests/test_train.py checks).
SECRET_CANARY = "hf_raysftCanaryToken0123456789"
os.environ["HF_TOKEN"] = SECRET_CANARY
# Ray Train's controller polls the workers (reports, checkpoint commits, a finished or dead worker) every 2 s by
# default; a test run of a few 0.1 s steps would spend most of its time waiting for the poll. Set before any Ray
# starts, so every Ray of the session (in-process, `ray start` clusters, the CLI's) inherits it. raysft's own
# report pacing (train/report.ReportGate) reads the same variable.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# W&B writes its runs to files (no account, no network) on the driver and every Ray worker
os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
# the MLflow tracking server the tests start: its own venv (scripts/install.sh makes it), as a real server would be
MLFLOW_SERVER = os.environ.get("RAYSFT_MLFLOW_SERVER",
                               os.path.expanduser("~/.cache/raysft/mlflow-server/bin/mlflow"))


@pytest.fixture(scope="session")
def tokenizer():
    from make_assets import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny-ChatML model folder (config + tokenizer), like examples/tiny-chatml."""
    from make_assets import make_model_folder

    path = str(tmp_path_factory.mktemp("tiny-model"))
    make_model_folder(path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (starting Ray is the slow part)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_pretrained_dir(tmp_path_factory, tiny_model_dir):
    """A tiny model saved with weights (seeded), loaded as a pretrained model: the base for LoRA runs."""
    from raysft.modeling import build_model

    path = str(tmp_path_factory.mktemp("tiny-pretrained"))
    build_model(tiny_model_dir, 386, from_scratch=True, seed=5).save_pretrained(path)
    for f in os.listdir(tiny_model_dir):
        if "token" in f:
            os.link(os.path.join(tiny_model_dir, f), os.path.join(path, f))
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, artifacts in a temp folder); its URI."""
    import socket
    import subprocess
    import time
    import urllib.request

    assert os.path.exists(MLFLOW_SERVER), f"no MLflow server at {MLFLOW_SERVER}: run `bash scripts/install.sh`"
    folder = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen([MLFLOW_SERVER, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2):
                break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield uri
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session", autouse=True)
def shared_prepared(tmp_path_factory):
    """One data.prepared_path for the session's training runs (helpers.run_config): each dataset is prepared once,
    by fingerprint, and reused by every run on the same data and settings."""
    helpers.SHARED["prepared"] = str(tmp_path_factory.mktemp("prepared"))
    yield helpers.SHARED["prepared"]
    helpers.SHARED.clear()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_model_dir, ray_session):
    """The uninterrupted run every fault, resume and resize test compares with (helpers.run_config: 6 steps,
    2 workers, ZeRO-2, checkpoints at 2, 4, 6), trained once per session; the trained model's logits of the first
    row go to probe.pt. (config, train's result)."""
    from raysft.train.launch import train

    from faults import Faults

    tmp = tmp_path_factory.mktemp("ref")
    cfg = helpers.run_config(tmp, tiny_model_dir, "ref")
    return cfg, train(None, [], cfg=cfg, hooks=Faults(probe=os.path.join(cfg.output_dir, "probe.pt")))
