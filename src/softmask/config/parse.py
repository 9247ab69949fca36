"""YAML files, dotted ``key=value`` overrides and the dict -> dataclass conversion with type checks."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from softmask.config.files import resolve_config_path
from softmask.config.schema import Config, ConfigError, ModelConfig

# --------------------------------------------------------------------------------------------------
# Dict <-> dataclass conversion with type checks
# --------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section and takes a mapping, got {_describe(value)}")
        return _from_dict(tp, value, key)
    if origin is Literal:  # one of fixed choices: read as a string here, checked by validate()
        return _convert(value, str, key)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} takes a mapping such as {{'a': 'b'}}, got {_describe(value)}")
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}[{k!r}]") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {_describe(value)}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {_describe(value)}")
    raise TypeError(f"config type {tp!r} of {key} is not supported")  # a bug in the schema


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in names:
            close = difflib.get_close_matches(str(raw_key), names, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            where = f"section '{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown key '{key}' in {where}{hint} (valid keys: {', '.join(names)})")
        kwargs[raw_key] = _convert(value, hints[raw_key], key)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Build a :class:`Config` from a plain (YAML-like) dict: convert the types, resolve the defaults that
    depend on other settings (:meth:`Config.resolve`), then validate every value."""
    cfg = _convert(data or {}, Config, "").resolve()
    cfg.validate()
    return cfg


def model_config_from_dict(data: dict | None, where: str = "model") -> ModelConfig:
    """Build and validate a :class:`ModelConfig` from the ``model`` section's dict."""
    cfg = _convert(data or {}, ModelConfig, where)
    cfg.validate(where)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain dicts and lists (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; errors name the file (and the line for syntax errors). A relative
    ``configs/...`` path that is not a file here reads the shipped config of that name
    (:func:`softmask.config.files.resolve_config_path`)."""
    path = resolve_config_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _split_list(body: str) -> list[str]:
    """Split ``a, b{1,2}, 'c,d'`` on the commas outside braces and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    items.append(body[start:])
    return [item.strip() for item in items if item.strip()]


def parse_override_value(raw: str):
    """A command-line value as YAML, except that ``[a, b]`` lists are split by hand so that brace
    patterns such as ``shards/cc3m-{000000..000331}.tar`` stay strings."""
    text = raw.strip()
    if not text:
        return ""
    if text.startswith("[") and text.endswith("]"):
        return [parse_override_value(item) for item in _split_list(text[1:-1])]
    if "{" in text and not text.startswith("{"):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    dotted, _, raw = override.partition("=")
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{override}': empty key segment in '{dotted}'")
    value = parse_override_value(raw)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override '{override}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def refuse_repeated_keys(overrides: list[str] | tuple[str, ...]) -> None:
    """A key given twice is a mistake (often a shell expanding an unquoted brace or glob pattern into
    several ``key=`` words, of which only the last would count): refuse it, naming both values."""
    seen: dict[str, str] = {}
    for override in overrides:
        key, value = override_key(override), override.partition("=")[2]
        if key in seen:
            raise ConfigError(
                f"{key} is given twice ({key}={seen[key]} and {key}={value}); give it once. If the shell expanded an "
                f"unquoted brace or glob pattern into several words, quote the whole argument ('{key}=...')")
        seen[key] = value


def override_key(override: str) -> str:
    """The dotted key of a ``key=value`` override."""
    return override.partition("=")[0].strip()


def merge_overrides(*lists: list[str] | tuple[str, ...]) -> list[str]:
    """Overrides composed by a program (e.g. the demo's own, then the user's): each key once, a later
    list's value replacing an earlier one's, in the order keys first appear."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            merged[override_key(override)] = override
    return list(merged.values())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted ``key=value`` overrides, and validate it.

    Args:
        path: a YAML file, or None for the built-in defaults.
        overrides: strings such as ``"model.text.fusion_layer=3"`` or ``"data.train=[a.json,b.json]"``.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: naming the file and/or the dotted key that is wrong.
    """
    data = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None:
            where = f"{path} with overrides {' '.join(overrides)}" if overrides else str(path)
            raise ConfigError(f"{where}: {exc}") from None
        raise


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config (or any dataclass section) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
