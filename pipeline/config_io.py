"""Reading, overriding, printing and hashing job configurations.

`load_config(path, overrides)` reads a YAML file (optional), applies dotted overrides such as
`{"routing.k": 5}` (the command line's flags and `--set KEY=VALUE`), and builds a `JobConfig`,
refusing unknown keys and badly typed values with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from actors.options import RETIRED as RETIRED_GENERATION
from pipeline.config import CALIBRATION_SOURCES, SECTIONS, ConfigError, JobConfig
from pipeline.storage import normal_uri

log = logging.getLogger(__name__)

HASHED_KEYS = (
    "model.path", "model.dtype", "model.device",
    "adapters.path",
    "routing.k", "routing.signal", "routing.probe_layers", "routing.probe_module", "routing.probe_input",
    "routing.calibration_score", "routing.calibration", "routing.calibration_sample",
    "routing.calibration_min_rows", "routing.calibration_seed", "routing.min_confidence",
    "routing.uncertain_below", "routing.uncertain_k",
    "generation.max_new_tokens", "generation.stop_at_newline", "generation.stop_strings", "generation.overlong",
    "generation.max_prompt_tokens",
    "input.uri", "input.prompt_column", "input.id_column", "input.passthrough",
)
"""The keys that decide a row's result: the job's hash covers these and nothing else, so every other
key (resources, storage, output, run, `adapters.max_resident`, and the generation keys that only
choose how rows are batched: probe_bucket_overhead, generate_step_slots, ordering) may change
between a run and its resume. Each value is hashed in its normal form (`hashed_values`)."""
URI_KEYS = ("model.path", "adapters.path", "input.uri", "routing.calibration")
"""Hashed keys holding a location, compared as the place they name (`storage.normal_uri`)."""
# Keys of earlier versions, still read: (section, old name) -> new name.
RENAMED = {("routing", "probe_layer"): "probe_layers"}
# Keys of earlier versions in another section, still read there: (old section, key) -> new section.
MOVED = {("routing", "grouping"): "generation", ("routing", "max_groups"): "generation"}
# Keys of earlier versions that no longer change anything: read and ignored, with a warning.
RETIRED = {("generation", key) for key in RETIRED_GENERATION}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _list_name(tp: Any) -> str:
    return "a list of strings" if typing.get_args(tp)[0] is str else "a list of integers"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the field's own type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for option in inner:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        names = " or ".join(_list_name(t) if typing.get_origin(t) is tuple else _type_name(t) for t in inner)
        raise ConfigError(f"{key}: expected {names}; got {value!r}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_list_name(tp)}; got {value!r}")
        item_tp = typing.get_args(tp)[0]
        for item in value:
            try:
                _coerce(item, item_tp, key)
            except ConfigError:
                raise ConfigError(f"{key}: expected {_list_name(tp)}; item {item!r} is not "
                                  f"{'a string' if item_tp is str else 'an integer'}") from None
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string; got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {_type_name(tp)}")  # internal: a new field type


def _build_section(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keys to values; got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        if isinstance(name, str):
            name = RENAMED.get((key, name), name)
        if (key, name) in RETIRED:
            log.warning("%s.%s no longer changes anything (every generate call mixes all its rows at once); "
                        "ignored: remove it from the job file", key, name)
            continue
        if not isinstance(name, str) or name not in known:
            raise ConfigError(f"{key}.{name}: unknown key; known keys: {', '.join(known)}")
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: required key is missing")
    return cls(**kwargs)


def _move_old_keys(data: Mapping) -> dict:
    """`data` with each key of `MOVED` in its new section; refuses one set in both places differently."""
    result = {name: dict(section) if isinstance(section, Mapping) else section for name, section in data.items()}
    for (old, key), new in MOVED.items():
        if not isinstance(result.get(old), Mapping) or key not in result[old]:
            continue
        value = result[old].pop(key)
        target = result.get(new)
        target = result[new] = {} if target is None else target
        if not isinstance(target, Mapping):
            continue  # the section's own check names it
        if key in target and target[key] != value:
            raise ConfigError(f"{old}.{key}: now {new}.{key}, which is set too, to {target[key]!r}; "
                              f"keep only {new}.{key}")
        target[key] = value
    return result


def config_from_dict(data: Any) -> JobConfig:
    """Build a `JobConfig` from a nested mapping, refusing unknown keys and bad values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"configuration: expected a mapping of sections; got {type(data).__name__}")
    by_name = {cls.section: cls for cls in SECTIONS}
    for name in data:
        if not isinstance(name, str) or name not in by_name:
            raise ConfigError(f"{name}: unknown section; known sections: {', '.join(by_name)}")
    data = _move_old_keys(data)
    for name in ("model", "adapters", "input", "output"):
        if name not in data:
            raise ConfigError(f"{name}: required section is missing (at least {name}.{_first_field(by_name[name])})")
    sections = {name: _build_section(by_name[name], value if value is not None else {}, name)
                for name, value in data.items()}
    return JobConfig(**sections)


def _first_field(cls: type) -> str:
    return dataclasses.fields(cls)[0].name


def apply_overrides(data: Mapping, overrides: Mapping[str, Any]) -> dict:
    """Return a copy of `data` with each dotted key (`section.key`) set to its value."""
    result = {name: dict(section) if isinstance(section, Mapping) else section for name, section in data.items()}
    for dotted, value in overrides.items():
        section, sep, key = dotted.partition(".")
        if not sep or not key or "." in key:
            raise ConfigError(f"{dotted}: overrides are written section.key (e.g. routing.k=5)")
        target = result.setdefault(section, {})
        if target is None:
            target = result[section] = {}
        if not isinstance(target, Mapping):
            raise ConfigError(f"{section}: expected a mapping of keys to values; got {target!r}")
        target[key] = value
    return result


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse `KEY=VALUE` strings (values in YAML syntax: 5, true, null, [a, b]) into overrides."""
    result = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. routing.k=5")
        result[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def read_yaml(path: str | Path) -> Mapping:
    """A job file's sections as read, before any check of their keys and values."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Read a YAML job file (optional), apply dotted overrides, and build a checked `JobConfig`."""
    data: Any = {} if path is None else read_yaml(path)
    try:
        return config_from_dict(apply_overrides(data, overrides or {}))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def config_to_dict(config: JobConfig) -> dict:
    """The configuration as plain JSON-compatible data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _normal_value(key: str, value: Any) -> Any:
    if key in URI_KEYS and isinstance(value, str) and not (key == "routing.calibration"
                                                           and value in CALIBRATION_SOURCES):
        return normal_uri(value)
    if key == "routing.probe_module":  # a set of names: the router scores them in sorted order
        return sorted([value] if isinstance(value, str) else value)
    return value


def hashed_values(config: JobConfig) -> dict[str, Any]:
    """`HASHED_KEYS` -> value, JSON-compatible, in normal form: locations as the place they name
    (trailing slash, `.`, `..` and repeated slashes removed; local paths absolute), `probe_module`
    as a sorted list, `auto` dtype and device resolved where the configuration decides them
    (`pipeline.placement`). Recorded in `_job.json`, so a refused resume can name the keys."""
    from pipeline.placement import resolve_placement

    data = config_to_dict(resolve_placement(config))
    out = {}
    for key in HASHED_KEYS:
        section, name = key.split(".")
        out[key] = _normal_value(key, data[section][name])
    return out


def config_hash(config: JobConfig) -> str:
    """SHA-256 over `hashed_values`: what decides the results (not resources, storage or output)."""
    return hashlib.sha256(json.dumps(hashed_values(config), sort_keys=True).encode()).hexdigest()


def changed_keys(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for each hashed key whose value differs between two `hashed_values`."""
    return [f"{key}: {json.dumps(recorded.get(key))} -> {json.dumps(now.get(key))}"
            for key in sorted(set(recorded) | set(now)) if recorded.get(key) != now.get(key)]
