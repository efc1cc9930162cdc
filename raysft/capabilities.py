"""What each training backend can do, as data: the one place that knows the backends by name.

The config checks (`config/checks.py`), launch, evaluation, the model card and the docs read a backend's
`Capabilities` instead of comparing `train.backend` with a name, so a backend that gains (or loses) a capability
changes what they accept by changing its entry here. The backend's code lives in `raysft/train/backends/<name>.py`
(`module`), behind the protocol of `raysft/train/loop.py`. This module imports nothing from raysft.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Capabilities:
    name: str
    module: str  # raysft.train.backends.<name>: its `Backend` class
    zero_stages: tuple = (0, 1, 2, 3)  # train.zero_stage values it trains with
    dtypes: tuple = ("fp32", "bf16", "fp16")
    offload_on_cpu: bool = True  # train.offload_* with cluster.use_gpu false
    elastic: bool = True  # cluster.num_workers as a [min, max] range
    resume_other_world: str = ""  # how a checkpoint of another worker count resumes: universal | reshard | "" (not)
    long_rows: bool = False  # sequence parallelism, tiled MLP, activation offload (DeepSpeed's ALST pieces)
    deepspeed: bool = False  # runs DeepSpeed: reads train.deepspeed_config, compiles its CPU extension on CPU
    hf_args: bool = False  # reads train.hf_args (TRL's SFTConfig)
    lora: bool = True  # train.lora (PEFT adapters)
    engine_clips: bool = False  # its engine clips gradients at train.max_grad_norm itself (else the loop does)
    own_loop: bool = True  # raysft's loop runs the steps; else the framework's loop calls the loop's step functions
    params_always_sharded: bool = False  # parameters sharded between steps at every stage (generation gathers)
    limits: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # a refused setting -> (why, the fix)

    def params_sharded(self, zero_stage: int) -> bool:
        """Whether the parameters are sharded between steps (generation must gather them)."""
        return self.params_always_sharded or zero_stage == 3


BACKENDS: dict[str, Capabilities] = {
    "deepspeed": Capabilities(
        "deepspeed", "raysft.train.backends.deepspeed", resume_other_world="universal", long_rows=True,
        deepspeed=True, engine_clips=True),
    "fsdp": Capabilities(
        "fsdp", "raysft.train.backends.fsdp", zero_stages=(2, 3), dtypes=("fp32", "bf16"), offload_on_cpu=False,
        resume_other_world="reshard", params_always_sharded=True, limits={
            "zero_stage": ("always shards parameters, gradients and optimizer state; it has stages 2 and 3 only",
                           "set train.zero_stage=2 (each layer's parameters kept gathered from forward to backward) "
                           "or 3 (resharded after forward: least memory)"),
            "dtype": ("trains in bf16 (fp32 master weights) or fp32; fp16 needs loss scaling it does not do",
                      "set train.dtype=bf16"),
            "offload": ("offloads from a GPU (FSDP2's CPUOffloadPolicy), and cluster.use_gpu is false: on CPU "
                        "everything is in CPU memory already", ""),
        }),
    "hf": Capabilities(
        "hf", "raysft.train.backends.hf", elastic=False, deepspeed=True, hf_args=True, engine_clips=True,
        own_loop=False),
}
NAMES = tuple(BACKENDS)


def of(name: str) -> Capabilities:
    """The capabilities of backend `name` (the config schema admits only the names of BACKENDS)."""
    return BACKENDS[name]


def having(capability: str, value=True) -> list[str]:
    """The backends whose `capability` is `value` (truthy for value=True), in BACKENDS' order.

    >>> having("elastic"), having("hf_args")
    (['deepspeed', 'fsdp'], ['hf'])
    """
    return [n for n, c in BACKENDS.items() if (bool(getattr(c, capability)) if value is True
                                               else getattr(c, capability) == value)]


def with_zero_stage(stage: int) -> list[str]:
    return [n for n, c in BACKENDS.items() if stage in c.zero_stages]


def with_dtype(dtype: str) -> list[str]:
    return [n for n, c in BACKENDS.items() if dtype in c.dtypes]


def names(backends: list[str], noun: str = "backend") -> str:
    """'the deepspeed backend', 'the deepspeed and hf backends'."""
    return f"the {' and '.join(backends)} {noun}{'s' if len(backends) > 1 else ''}"
