"""The one typed config tree: YAML file + dotted `key=value` overrides, strictly validated.

    schema.py   the dataclasses, their docs and every default
    load.py     YAML + overrides -> Config; type checks with file:line; from_dict for workers and checkpoints
    checks.py   cross-field checks, each with its fix
"""

from raysft.config.load import from_dict, load_config
from raysft.config.schema import (
                                  CheckpointConfig,
                                  ClusterConfig,
                                  Config,
                                  ConfigError,
                                  DataConfig,
                                  LoraConfig,
                                  ModelConfig,
                                  TokenizerConfig,
                                  TrainConfig,
                                  describe,
                                  to_dict,
                                  to_yaml,
                                  worker_range,
)

__all__ = ["CheckpointConfig", "ClusterConfig", "Config", "ConfigError", "DataConfig", "LoraConfig", "ModelConfig",
           "TokenizerConfig", "TrainConfig", "describe", "from_dict", "load_config", "to_dict", "to_yaml",
           "worker_range"]
