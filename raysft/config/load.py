"""Loading a config: YAML file + dotted `key=value` overrides -> `Config`, strictly validated.

Every problem (unknown key, wrong type, bad value, inconsistent batch sizes) is collected and raised together
as one `ConfigError`, each line saying where (file:line and dotted key), what, the value, and the fix, before
Ray starts. Relative local paths are made absolute against the current directory, because Ray Train
workers run in another working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Optional

import yaml

from raysft.config.checks import check
from raysft.config.schema import Config, ConfigError
from raysft.errors import format_error
from raysft.storage import absolute


def _line_map(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML text (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")
        elif isinstance(node, yaml.SequenceNode) and prefix:  # data.sources[1].weight
            for i, item in enumerate(node.value):
                key = f"{prefix[:-1]}[{i}]"
                lines[key] = item.start_mark.line + 1
                walk(item, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError([format_error(f"override {item!r}", "expected key=value", fix="write e.g. train.lr=2e-5")])
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any) -> Any:
    """Value converted to `tp`, or ValueError with what was expected."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) not in typing.get_args(tp):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option)
            except ValueError:
                pass
        raise ValueError(f"must be {' or '.join(_type_name(a) for a in typing.get_args(tp))}")
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"must be set ({_type_name(tp)})")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("must be a string")
    if origin is list and typing.get_args(tp) == (dict,):
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return [dict(v) for v in value]
        raise ValueError("must be a list of mappings")
    if origin is list and typing.get_args(tp) == (int,):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ValueError("must be a list of integers")
    if origin is list:
        if isinstance(value, str):  # a single path is a list of one
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError("must be a string or a list of strings")
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError("must be a mapping")
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp) -> str:
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    if tp in simple:
        return simple[tp]
    if typing.get_origin(tp) is list:
        return f"a list of {({int: 'integers', dict: 'mappings'}).get(typing.get_args(tp)[0], 'strings')}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _build(cls, raw: Any, prefix: str, where, problems: list[str]):
    """Dataclass `cls` from the mapping `raw`, appending every problem to `problems`."""
    if not isinstance(raw, dict):
        problems.append(format_error(where(prefix.rstrip(".")), "must be a mapping", raw,
                                     f"write `{prefix.rstrip('.')}:` followed by indented keys"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(fields)}"
            problems.append(format_error(where(dotted), "unknown key", fix=fix))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted + ".", where, problems)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError as exc:
            problems.append(format_error(where(dotted), str(exc), value,
                                         f"give {_type_name(tp)} ({dotted}: {fields[key].metadata.get('doc', '')})"))
    return cls(**kwargs)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Config from a YAML file (or none) and `key=value` overrides; raises ConfigError listing every problem."""
    raw: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            problem = format_error(path, "cannot read config", fix=f"check the path ({exc.strerror})")
            raise ConfigError([problem]) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            loc = f"{path}:{mark.line + 1}" if mark else path
            raise ConfigError([format_error(loc, "not valid YAML", fix=str(getattr(exc, "problem", exc)))]) from None
        if not isinstance(raw, dict):
            raise ConfigError([format_error(path, "must be a YAML mapping of keys", type(raw).__name__,
                                            "start with e.g. `output_dir: runs/x`")])
        lines = _line_map(text)
    override_keys = set()
    problems: list[str] = []
    for item in overrides or []:
        try:
            key, value = _parse_override(item)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        _set_dotted(raw, key, value)
        override_keys.add(key)

    def where(key: str) -> str:
        plain = key.split("[")[0]  # data.sources[1].weight was set by the override of data.sources
        if key in override_keys or plain in override_keys or any(
                k.startswith(key + ".") or key.startswith(k + ".") for k in override_keys):
            return f"command line: {key}"
        if key in lines:
            return f"{path}:{lines[key]}: {key}"
        return f"{path}: {key}" if path else key

    cfg = _build(Config, raw, "", where, problems)
    if not problems:
        check(cfg, where, problems)
    if problems:
        raise ConfigError(problems)
    cfg.output_dir = absolute(cfg.output_dir)
    cfg.data.train_files = [absolute(p) for p in cfg.data.train_files]
    cfg.data.eval_files = [absolute(p) for p in cfg.data.eval_files]
    for sub in (cfg.model, cfg.tokenizer):
        if sub.name_or_path and (sub.name_or_path.startswith((".", "/", "~")) or os.path.exists(sub.name_or_path)):
            sub.name_or_path = absolute(sub.name_or_path)
    if cfg.data.hf_dataset and os.path.exists(cfg.data.hf_dataset):
        cfg.data.hf_dataset = absolute(cfg.data.hf_dataset)
    for source in cfg.data.sources:
        if source.get("files"):
            source["files"] = [absolute(p) for p in ([source["files"]] if isinstance(source["files"], str)
                                                     else source["files"])]
        if source.get("hf_dataset") and os.path.exists(source["hf_dataset"]):
            source["hf_dataset"] = absolute(source["hf_dataset"])
    cfg.checkpoint.storage_path = absolute(cfg.checkpoint.storage_path) or os.path.join(cfg.output_dir, "ray")
    cfg.data.prepared_path = absolute(cfg.data.prepared_path) or os.path.join(cfg.output_dir, "prepared")
    cfg.run_name = cfg.run_name or os.path.basename(cfg.output_dir.rstrip("/")) or "raysft"
    return cfg


def from_dict(raw: dict) -> Config:
    """A resolved config back from `to_dict` (in Ray workers, and from a checkpoint's config.yaml)."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", lambda key: key, problems)
    if problems:
        raise ConfigError(problems)
    return cfg
