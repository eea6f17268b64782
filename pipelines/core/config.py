"""Strict YAML -> frozen dataclasses: the machinery every configuration file goes through.

:func:`build` turns a parsed YAML mapping into a dataclass, rejecting unknown keys, missing
required keys and values of the wrong type with a :class:`~pipelines.core.errors.ConfigError`
that names the file and the key path. Durations are read by
:func:`pipelines.core.times.parse_duration`. The files themselves (environments, contracts,
feature views) are described in :mod:`pipelines.core.settings`,
:mod:`pipelines.core.contract_spec` and :mod:`pipelines.core.view_spec`.

Secrets never live in YAML: a setting that needs one names the environment variable that holds
it (``*_env`` keys), and :func:`secret_from_env` reads it at the edge that needs it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.errors import ConfigError
from pipelines.core.times import parse_duration


def secret_from_env(variable: str, purpose: str) -> str:
    """The value of environment variable ``variable``; a clear error if it is unset or empty."""
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{purpose}: environment variable {variable} is not set")
    return value


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a parsed YAML mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key (expected one of: {', '.join(sorted(fields))})"
        )
    values = {}
    for name, spec in fields.items():
        key = _join(where, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**values)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where and not where.endswith(":") else f"{where} {name}".strip()


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if hint is timedelta:
        return parse_duration(value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not true/false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return str(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return types.MappingProxyType(
            {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
        )
    raise TypeError(f"unsupported config type {hint!r} at {key}")  # a bug in this module


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(assignments: list[str] | None) -> dict[str, Any]:
    """``["ingest.max_offsets_per_trigger=5000", ...]`` -> nested mapping (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for assignment in assignments or []:
        path, sep, raw = assignment.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
        node = tree
        *parents, leaf = path.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a ConfigError naming the file if it is not one."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return dict(data)
