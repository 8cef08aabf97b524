"""Loading a ``RunConfig`` from YAML and ``section.field=value`` overrides: every value is
coerced to its field's type, and an unknown or mistyped field is named."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_mfm.config.run import RunConfig
from megatron_mfm.config.sections import ConfigError


def _build(cls: type, values: Any, path: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, recursively, naming unknown or mistyped fields."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown field{hint}")
        kwargs[key] = _coerce(hints[key], value, where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path or 'config'}: {error}") from error


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (typing.Any, typing.Any)
        return {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{where}[{n}]") for n, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (list, dict, bool)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return "" if value is None else str(value)
    return value


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""  # "key=" means empty


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Config from an optional YAML file plus ``section.field=value`` overrides."""
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        tree = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    return _build(RunConfig, tree, "")


def config_to_dict(config: RunConfig) -> dict:
    """Plain nested dict (for checkpoints and logs)."""
    return dataclasses.asdict(config)
