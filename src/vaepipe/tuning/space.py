"""tune.yaml: the search space (ranges, choices, log scales of params.yaml keys) and how to
search it; every bound and choice is checked against params.yaml's own rules before a trial."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaepipe import config
from vaepipe.errors import ConfigError

DEFAULT_FILE = Path("tune.yaml")
OBJECTIVES = ("val", "test")
SAMPLERS = ("tpe", "random")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOP = {"study", "objective", "with_train_seconds", "trials", "timeout_minutes", "sampler",
       "seed", "pruning", "storage", "heartbeat_seconds", "enqueue", "space"}  # fmt: skip


@dataclass(frozen=True)
class Dimension:
    """One searched param: a float or int range (log scale or a step), or choices."""

    key: str  # params.yaml key, e.g. train.lr
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            # Optuna's choices are scalars: a list (model.hidden) travels as its YAML text
            options = [_scalar(c) for c in self.choices]
            picked = trial.suggest_categorical(self.key, options)
            return yaml.safe_load(picked) if isinstance(picked, str) else picked
        if isinstance(self.low, int) and isinstance(self.high, int):
            step = self.step or 1
            return trial.suggest_int(self.key, self.low, self.high, step=step, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def bounds(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class Pruning:
    enabled: bool = True
    min_epochs: int = 40  # never pruned before this epoch: short probes mislead
    startup_trials: int = 5  # trials that run whole before any is compared


@dataclass(frozen=True)
class TuneConfig:
    study: str
    space: tuple[Dimension, ...]
    objective: str = "val"
    with_train_seconds: bool = False  # a second objective: the Pareto front of NLL and time
    trials: int = 20
    timeout_minutes: float | None = None
    sampler: str = "tpe"
    seed: int | None = None
    pruning: Pruning = field(default_factory=Pruning)
    storage: str | None = None
    heartbeat_seconds: int = 15  # a worker silent 4 times this long has its trial failed
    enqueue: tuple[dict, ...] = ()

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.with_train_seconds else ["minimize"]

    @property
    def prunes(self) -> bool:  # Optuna prunes single-objective studies only
        return self.pruning.enabled and not self.with_train_seconds


def _scalar(value):
    return yaml_text(value) if isinstance(value, list) else value


def _where(path: Path, what: str) -> str:
    return f"{path}: {what}"


def _number(path: Path, key: str, name: str, value, kind=(int, float)):
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(_where(path, f"space '{key}': {name} must be a number, not {value!r}"))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(_where(path, f"space '{key}': {name} must be finite"))
    return value


def _dimension(path: Path, key: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict):
        raise ConfigError(
            _where(path, f"space '{key}' must be a mapping: {{low, high, log}} or {{choices}}")
        )
    unknown = set(spec) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(_where(path, f"space '{key}': unknown field(s) {sorted(unknown)}"))
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or set(spec) != {"choices"}:
            raise ConfigError(
                _where(path, f"space '{key}': choices must be a non-empty list, alone")
            )
        return Dimension(key, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(_where(path, f"space '{key}' needs low and high (or choices)"))
    low = _number(path, key, "low", spec["low"])
    high = _number(path, key, "high", spec["high"])
    step = spec.get("step")
    if step is not None and _number(path, key, "step", step) <= 0:
        raise ConfigError(_where(path, f"space '{key}': step must be > 0"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(_where(path, f"space '{key}': log must be true or false"))
    if not low < high:
        raise ConfigError(_where(path, f"space '{key}': low {low} must be below high {high}"))
    if log and (low <= 0 or step is not None):
        raise ConfigError(_where(path, f"space '{key}': a log scale needs low > 0 and no step"))
    return Dimension(key, low=low, high=high, log=log, step=step)


def check_against_params(
    path: Path, space: tuple[Dimension, ...], raw_params: dict
) -> tuple[Dimension, ...]:
    """Every key is a param of params.yaml, and each bound or choice, set alone, is a value
    params.yaml accepts (its ranges, types and combinations); the space with a float param's
    bounds as floats (`train.beta: {low: 1, high: 4}` searches 1.0 to 4.0, not 1, 2, 3, 4)."""
    params = config.from_dict(raw_params)
    known = config.flatten(params)
    out = []
    for dim in space:
        if dim.key not in known:
            close = difflib.get_close_matches(dim.key, list(known), n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(_where(path, f"unknown param '{dim.key}' in space{hint}"))
        if isinstance(known[dim.key], int) and dim.choices is None:
            if not (isinstance(dim.low, int) and isinstance(dim.high, int)):
                raise ConfigError(
                    _where(path, f"space '{dim.key}': an integer param needs integer bounds")
                )
        for value in dim.bounds():
            try:
                config.from_dict(config.with_sets(raw_params, [f"{dim.key}={yaml_text(value)}"]))
            except ConfigError as e:
                raise ConfigError(
                    _where(path, f"space '{dim.key}': {value!r} is not allowed: {e}")
                ) from None
        if isinstance(known[dim.key], float) and dim.choices is None:
            dim = dataclasses.replace(dim, low=float(dim.low), high=float(dim.high))
        out.append(dim)
    return tuple(out)


def check_enqueued(path: Path, first: dict, space: tuple[Dimension, ...]) -> dict:
    """A param set to try first: each value within its dimension; as Optuna takes it (a list
    choice as its YAML text)."""
    dims = {d.key: d for d in space}
    unknown = sorted(set(first) - set(dims))
    if unknown:
        raise ConfigError(_where(path, f"enqueue: {unknown} are not in the space"))
    out = {}
    for key, value in first.items():
        dim = dims[key]
        if dim.choices is not None:
            ok = value in list(dim.choices)
        else:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = number and dim.low <= value <= dim.high
        if not ok:
            raise ConfigError(_where(path, f"enqueue: {key}={value!r} is outside its space"))
        out[key] = _scalar(value)
    return out


def params_text(values: dict) -> str:
    """`train.lr=0.001242 model.hidden=[64]`: a trial's params, floats to 4 digits."""
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return " ".join(shown)


def yaml_text(value) -> str:
    """`value` as `dvc exp run -S` and params.yaml write it: 0.001, [512, 256], relu."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _pruning(path: Path, raw: Any) -> Pruning:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or set(raw) - {"enabled", "min_epochs", "startup_trials"}:
        raise ConfigError(_where(path, "pruning takes enabled, min_epochs and startup_trials"))
    out = Pruning(**raw)
    if not isinstance(out.enabled, bool):
        raise ConfigError(_where(path, "pruning.enabled must be true or false"))
    for name in ("min_epochs", "startup_trials"):
        value = getattr(out, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(_where(path, f"pruning.{name} must be an integer >= 0"))
    return out


def _choice(path: Path, name: str, value, allowed) -> str:
    if value not in allowed:
        allowed_text = ", ".join(allowed)
        raise ConfigError(_where(path, f"{name} must be one of {allowed_text}, not {value!r}"))
    return value


def _positive(path: Path, name: str, value, kind=int, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(_where(path, f"{name} must be a positive number, not {value!r}"))
    return value


def parse(path: Path, raw: Any, raw_params: dict) -> TuneConfig:
    if not isinstance(raw, dict):
        raise ConfigError(_where(path, "expected a mapping with a study name and a space"))
    unknown = set(raw) - TOP
    if unknown:
        raise ConfigError(_where(path, f"unknown key(s) {sorted(unknown)}; known: {sorted(TOP)}"))
    study = raw.get("study")
    if not isinstance(study, str) or not STUDY_NAME.fullmatch(study):
        raise ConfigError(_where(path, "study must be a name of letters, digits, . _ and -"))
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(_where(path, "space must map params.yaml keys to ranges or choices"))
    dims = tuple(_dimension(path, str(k), v) for k, v in space.items())
    dims = check_against_params(path, dims, raw_params)
    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise ConfigError(_where(path, "enqueue must be a list of {param: value} mappings"))
    enqueue = [check_enqueued(path, {str(k): v for k, v in e.items()}, dims) for e in enqueue]
    with_seconds = raw.get("with_train_seconds", False)
    if not isinstance(with_seconds, bool):
        raise ConfigError(_where(path, "with_train_seconds must be true or false"))
    storage = raw.get("storage")
    if storage is not None and not isinstance(storage, str):
        raise ConfigError(_where(path, "storage must be a database URL"))
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(_where(path, "seed must be an integer"))
    return TuneConfig(
        study=study,
        space=dims,
        objective=_choice(path, "objective", raw.get("objective", "val"), OBJECTIVES),
        with_train_seconds=with_seconds,
        trials=_positive(path, "trials", raw.get("trials", 20)),
        timeout_minutes=_positive(
            path, "timeout_minutes", raw.get("timeout_minutes"), (int, float), allow_none=True
        ),
        sampler=_choice(path, "sampler", raw.get("sampler", "tpe"), SAMPLERS),
        seed=seed,
        pruning=_pruning(path, raw.get("pruning")),
        storage=storage,
        heartbeat_seconds=_positive(path, "heartbeat_seconds", raw.get("heartbeat_seconds", 15)),
        enqueue=tuple(enqueue),
    )


def load(path: Path = DEFAULT_FILE, params_path: Path = Path("params.yaml")) -> TuneConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the search space {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path} is not valid YAML ({why})") from None
    try:
        raw_params = yaml.safe_load(params_path.read_text())
    except (OSError, yaml.YAMLError):
        config.load(params_path)  # raises the one-line error of params.yaml
        raise
    return parse(path, raw, raw_params)
