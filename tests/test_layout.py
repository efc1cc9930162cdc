"""The package's shape: no import cycle between raysft's modules (counting imports inside functions too), every
module imports on its own in a fresh interpreter, the pure data modules import neither ray nor torch, no module of
raysft/data/ is over 300 lines, and docs/ARCHITECTURE.md names every module."""

import ast
import os
import subprocess
import sys

import pytest

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "raysft")
PURE = ["raysft.data.records", "raysft.data.chatml", "raysft.data.tokenize", "raysft.data.packing",
        "raysft.data.sources", "raysft.data.chunks", "raysft.data.prepared", "raysft.data.jsonarray",
        "raysft.data.jsonscan", "raysft.data.messages", "raysft.data.transcripts", "raysft.storage", "raysft.errors"]


def modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, name)
    return out


def imports(path: str, known: set[str], top_level_only: bool = False) -> set[str]:
    """raysft modules (and, for the purity check, any top-level package) that a file imports."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found


def test_no_import_cycle_between_raysft_modules():
    mods = modules()
    graph = {m: {i for i in imports(f, set(mods)) if i in mods and i != m and not m.startswith(i + ".")}
             for m, f in mods.items()}
    # packages' __init__ re-export their modules: an edge into a package is an edge into what it re-exports
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n] if n in path else path + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_pure_data_modules_import_neither_ray_nor_torch():
    mods = modules()
    heavy = {m: sorted(i for i in imports(mods[m], set(mods), top_level_only=True)
                       if i.split(".")[0] in ("ray", "torch", "transformers", "deepspeed", "trl"))
             for m in PURE}
    assert heavy == {m: [] for m in PURE}


@pytest.mark.parametrize("module", sorted(m for m in modules() if not m.endswith("__main__")))  # that one runs
def test_every_module_imports_alone_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def test_architecture_doc_names_every_module():
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
        doc = f.read()
    files = sorted(os.path.relpath(f, ROOT) for f in modules().values() if not f.endswith("__init__.py"))
    assert [f for f in files if f"`{f}`" not in doc] == []


def test_no_data_module_is_over_300_lines():
    """The data modules stay small enough to read whole (issue 38): a module that grows past 300 lines is split
    where its parts meet (as jsonscan from jsonarray, transcripts from messages)."""
    long = {m: n for m, f in modules().items() if m.startswith("raysft.data.")
            for n in [sum(1 for _ in open(f, encoding="utf-8"))] if n > 300}
    assert long == {}


def _source(skip: tuple = ()) -> dict[str, str]:
    return {os.path.relpath(f, ROOT): open(f, encoding="utf-8").read() for f in modules().values()
            if os.path.relpath(f, ROOT) not in skip}


def test_one_definition_each_of_the_loss_normalisation_adamw_and_the_scheduler():
    """The training loop's shared parts are defined once (issue 41): every backend normalises the loss through
    loss.global_mean_part, builds AdamW and the learning-rate schedule through optim.adamw / optim.scheduler."""
    import re

    src = _source()
    count = lambda pattern: {f: len(re.findall(pattern, s)) for f, s in src.items() if re.search(pattern, s)}  # noqa: E731
    assert count(r"def global_mean_part\(") == {"raysft/loss.py": 1}
    assert count(r"loss_sum\([^()]*\)\s*/") == {}  # no loss divided anywhere else
    assert count(r"optim\.AdamW\(") == {"raysft/train/optim.py": 1}
    assert count(r"\bget_scheduler\(") == {"raysft/train/optim.py": 1}
    assert count(r"clip_grad_norm_\(") == {"raysft/train/backends/fsdp.py": 1}  # the engines clip the others'


def test_no_backend_name_is_compared_outside_capabilities():
    """Code asks a backend's capabilities (raysft/capabilities.py), never its name."""
    import re

    name = r"""["'](?:deepspeed|fsdp|hf)["']"""
    compared = re.compile(rf"backend\W{{0,3}}\s*(?:==|!=|\bin\b|\bnot in\b)\s*[\"'(\[{{]|{name}\s*(?:==|!=|\bin\b)")
    found = {f: compared.findall(s) for f, s in _source(skip=("raysft/capabilities.py",)).items()}
    assert {f: hits for f, hits in found.items() if hits} == {}


def test_a_backends_capabilities_decide_what_the_config_checks_accept(monkeypatch, tmp_path):
    """Change what a backend declares, and the config checks change with it: no check reads the backend's name."""
    import dataclasses

    from raysft import capabilities
    from raysft.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nmodel:\n  name_or_path: x\ndata:\n  train_files: [a.jsonl]\n")
    asks = [("train.backend=fsdp", "train.zero_stage=1"), ("train.backend=hf", "cluster.num_workers=[1, 2]"),
            ("train.backend=fsdp", "train.sequence_parallel_size=2", "cluster.num_workers=2")]
    for ask in asks:
        with pytest.raises(ConfigError):
            load_config(str(path), list(ask))
    backends = dict(capabilities.BACKENDS)
    backends["fsdp"] = dataclasses.replace(backends["fsdp"], zero_stages=(1, 2, 3), long_rows=True)
    backends["hf"] = dataclasses.replace(backends["hf"], elastic=True)
    monkeypatch.setattr(capabilities, "BACKENDS", backends)
    for ask in asks:
        load_config(str(path), list(ask))  # accepted now
    backends["deepspeed"] = dataclasses.replace(backends["deepspeed"], dtypes=("fp32", "bf16"))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["train.dtype=fp16"])
    assert info.value.problems == ["command line: train.dtype: the deepspeed backend does not train in fp16 (got "
                                   "'fp16'). fix: set train.backend=hf for fp16"]
