"""Typed params: params.yaml parsed once into dataclasses (vaepipe.config.schema), validated, and
flattened for logging.

Every problem is reported as a ConfigError naming the key, the value and what is allowed, so a
bad `dvc exp run -S key=value` fails before any work is done.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from vaepipe.config.checks import check_combinations
from vaepipe.config.checks import show as _show
from vaepipe.config.schema import (
    MAX_WIDTH,
    SECTIONS,
    ClassifierConfig,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    MlflowConfig,
    ModelConfig,
    Params,
    TrainConfig,
)
from vaepipe.errors import ConfigError

__all__ = [
    "ClassifierConfig",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "MlflowConfig",
    "ModelConfig",
    "Params",
    "TrainConfig",
    "flatten",
    "from_dict",
    "load",
    "to_dict",
    "with_sets",
]

KINDS = {"bool": bool, "int": int, "float": float, "str": str, "list": list}


def _unknown(key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
    return ConfigError(f"unknown param '{key}'{hint}")


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _typed(key: str, value: Any, f: dataclasses.Field) -> Any:
    """`value` as the field's type (YAML's exponent strings read as floats), or ConfigError."""
    kind = KINDS[f.type]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"param '{key}' = {_show(value)} must be true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"param '{key}' = {_show(value)} must be an integer")
    if kind is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-5 (no dot) as a string: `-S train.lr_min=1e-5` means a number
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"param '{key}' = {_show(value)} must be a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float, e.g. 10**400
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"param '{key}' = {_show(value)} must be a finite number")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"param '{key}' = {_show(value)} must be a string")
        if f.metadata.get("nonempty") and not value.strip():
            raise ConfigError(f"param '{key}' = {_show(value)} must not be empty")
    if kind is list and (
        not isinstance(value, list)
        or not all(
            isinstance(v, f.metadata.get("item", int))
            and not isinstance(v, bool)
            and 1 <= v <= MAX_WIDTH
            for v in value
        )
    ):
        raise ConfigError(
            f"param '{key}' = {_show(value)} must be a list of positive integers "
            f"(at most {MAX_WIDTH})"
        )
    return value


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """The typed value, checked against the field's choices and range."""
    value = _typed(key, value, f)
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"param '{key}' = {_show(value)} is not allowed; "
            f"choose one of: {', '.join(meta['choices'])}"
        )
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
            hi is not None and (value > hi or (hi_open and value == hi))
        )
        if bad:
            lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
            allowed = " and ".join(s for s in (lo_s, hi_s) if s)
            raise ConfigError(f"param '{key}' = {_show(value)} is out of range; must be {allowed}")
    return value


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = f"param '{prefix}'" if prefix else "the params file"
        raise ConfigError(f"{where} must be a mapping of keys, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = key if isinstance(key, str) else _show(key)  # YAML keys may be ints, null...
        full = f"{prefix}.{name}" if prefix else name
        if key not in fields:
            raise _unknown(full, list(fields))
        if cls is Params:
            kwargs[key] = _build(SECTIONS[key], value, full)
        else:
            kwargs[key] = _coerce(full, value, fields[key])
    missing = [name for name in fields if name not in kwargs]
    if missing:
        keys = ", ".join(f"'{prefix}.{m}'" if prefix else f"'{m}'" for m in missing)
        raise ConfigError(
            f"param {keys} {'is' if len(missing) == 1 else 'are'} missing; params.yaml must "
            "set every key (it is where the defaults live)"
        )
    return cls(**kwargs)


def with_sets(raw: dict, items: list[str]) -> dict:
    """A copy of a params mapping (as in params.yaml) with each `section.key=value` of items
    (the form of `dvc exp run -S`; values read as YAML: 2 -> int, 0.5 -> float, [32] -> list)
    laid over it. Raises ConfigError naming a malformed item, an unknown section or a value
    that is not YAML; from_dict then checks the keys and values as for params.yaml."""
    out = copy.deepcopy(raw)
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and name) or not isinstance(out.get(section), dict):
            raise ConfigError(
                f"override {_show(item)}: expected section.key=value with a section of "
                f"params.yaml ({', '.join(out)}), e.g. train.epochs=12"
            )
        try:
            out[section][name] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            why = getattr(e, "problem", None) or type(e).__name__  # one line, not the caret
            raise ConfigError(f"override {_show(item)}: the value is not YAML ({why})") from None
    return out


def from_dict(raw: Any) -> Params:
    """Validate a params mapping (as in params.yaml) into Params; raises ConfigError."""
    params = _build(Params, raw, "")
    check_combinations(params)
    return params


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read params file {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int beyond Python's digit limit
        raise ConfigError(f"params file {path} is not valid YAML: {e}") from None
    return from_dict(raw)


def flatten(params: Params) -> dict[str, Any]:
    """`{'model.latent_dim': 32, ...}`: the keys of params.yaml, as logged to MLflow."""
    out: dict[str, Any] = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(v):
                walk(v, key)
            else:
                out[key] = v

    walk(params, "")
    return out


def to_dict(params: Params) -> dict[str, Any]:
    return dataclasses.asdict(params)
