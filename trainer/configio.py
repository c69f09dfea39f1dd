"""Building a dataclass configuration tree from YAML and `key=value` overrides, and describing it.

Generic over the tree (the trainer's is `trainer.config.TrainConfig`): a field whose type is a dataclass is a
section, nested in YAML (`eval: {every: 2}`) and dotted in overrides and error messages (`eval.every`). Values
of overrides are parsed as YAML scalars and then coerced to the field's type, so `--set lr=1e-4` is a float and
`--set eval.every=0` an int; a list field takes a YAML list (`freeze: [a, b]`, `--set freeze=[a,b]`). Unknown keys are an error that lists the valid ones: a typo must never be silently
ignored. Every field carries its documentation in `metadata["help"]`, which `describe()` turns into the
configuration reference.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range; the message names the key."""


def documented(default, help: str, **kw):
    """A dataclass field with its documentation; a dataclass type as default makes a section of its defaults."""
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    if isinstance(default, list):  # a mutable default: each instance gets its own copy
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def check(cond: bool, key: str, message: str) -> None:
    """ConfigError "`key` message" unless `cond`."""
    if not cond:
        raise ConfigError(f"`{key}` {message}")


def dotted(section: str, name: str) -> str:
    """The full key of field `name` of the section at dotted path `section` ("" at the root)."""
    return f"{section}.{name}" if section else name


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _valid_keys(section: str, types: dict) -> str:
    return ", ".join(dotted(section, k) for k in sorted(types))


def coerce(value, tp, key: str):
    """`value` (from YAML) as type `tp`; ConfigError naming `key` when it does not fit."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"`{key}` must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                f"got {value!r}."
            )
        return value
    if typing.get_origin(tp) is list:
        return _coerce_list(value, typing.get_args(tp)[0], key)
    args = typing.get_args(tp)
    if args:  # a union such as int | str: the first member that accepts the value exactly
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"`{key}` must be an integer or a string, got {value!r}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"`{key}` must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"`{key}` must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"`{key}` must be a number, got {value!r}.") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"`{key}` must be a string, got {value!r}.")
        return str(value)
    raise AssertionError(f"unhandled field type {tp} of {key}")


def _coerce_list(value, item_tp, key: str) -> list:
    """A YAML list as list[item_tp] (only strings are used); None or an empty value is the empty list."""
    assert item_tp is str, f"unhandled list item type {item_tp} of {key}"
    if value is None or value == "":
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"`{key}` must be a list of non-empty strings, e.g. [a, b], got {value!r}.")
    return list(value)


def build(cls, data: dict, section: str = ""):
    """An instance of dataclass `cls` (the section at dotted path `section`) from a nested dict, with types
    coerced and unknown keys refused.

    A section defined outside the trainer (such as the teacher client's options) checks its own values and
    names its keys without the section; its ValueError is re-raised as a ConfigError with the full key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"`{section or 'config'}` must be a mapping, got {data!r}.")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown key `{dotted(section, unknown[0])}`; valid keys here: {_valid_keys(section, types)}."
        )
    kwargs = {}
    for name, value in data.items():
        tp = types[name]
        value = coerce(value, tp, dotted(section, name))
        if dataclasses.is_dataclass(tp):
            value = build(tp, value, dotted(section, name))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        message = str(err)
        if section and message.startswith("`"):
            raise ConfigError(f"`{section}.{message[1:]}") from None
        raise


def build_sections(obj) -> None:
    """Replaces every section of dataclass instance `obj` given as a dict by its dataclass (in place)."""
    for name, tp in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            object.__setattr__(obj, name, build(tp, value, name))


def apply_override(data: dict, assignment: str, root) -> None:
    """Applies one `key=value` (dotted key, YAML scalar value) to the nested dict `data` of the tree of dataclass
    `root`, in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. prefix.length=32).")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {assignment!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    cls, node = root, data
    for i, part in enumerate(parts):
        types = _field_types(cls)
        section, full = ".".join(parts[:i]), ".".join(parts[: i + 1])
        if part not in types:
            raise ConfigError(f"unknown key `{full}`; valid keys here: {_valid_keys(section, types)}.")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types[part]):
                raise ConfigError(
                    f"`{full}` is a section; set one of its keys, e.g. {full}."
                    f"{dataclasses.fields(types[part])[0].name}=..."
                )
            node[part] = value
        else:
            if not dataclasses.is_dataclass(types[part]):
                raise ConfigError(f"`{full}` is not a section; use {full}=value.")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"`{full}` must be a mapping.")
            cls = types[part]


def read_yaml(path: str | Path) -> dict:
    """The mapping of config keys in YAML file `path` (empty file: {})."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}.") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}.")
    return data


def describe(cls, section: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field of dataclass `cls`, sections flattened."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, dotted(section, f.name)))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(
            (
                dotted(section, f.name),
                repr(default) if isinstance(default, str) else str(default),
                f.metadata["help"],
            )
        )
    return rows
