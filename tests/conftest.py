"""Shared fixtures: the byte-level ChatML tokenizer, tiny model folders, and one Ray instance per session."""

from __future__ import annotations

import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYSFT_DASHBOARD", "0")  # tests do not need the dashboard; it costs a CPU on 2 cores
# A hub token in the environment of the driver and of every Ray worker (set before Ray starts): no file of a run
# may contain it (tests/test_train.py checks).
SECRET_CANARY = "hf_raysftCanaryToken0123456789"
os.environ["HF_TOKEN"] = SECRET_CANARY


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
