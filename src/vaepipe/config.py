"""Typed params: params.yaml parsed once into dataclasses, validated, and flattened for logging.

Every problem is reported as a ConfigError naming the key, the value and what is allowed, so a
bad `dvc exp run -S key=value` fails before any work is done.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaepipe.errors import ConfigError

DATASETS = ("fashion-mnist", "mnist", "digits", "npz")
BINARIZE = ("dynamic", "static", "none")
LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli")
HIERARCHICAL_ARCHS = ("hvae", "hvae_topdown")  # two stochastic layers
ARCHS = ("mlp", "conv", *HIERARCHICAL_ARCHS)
ACTIVATIONS = ("relu", "silu", "elu", "tanh")
IWAE_GRADIENTS = ("standard", "dreg")
PRIORS = ("standard", "vamp", "mog")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "cosine", "plateau")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PROVIDERS = ("auto", "cpu", "cuda")


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    return {"range": (lo, hi, lo_open, hi_open)}


# torch and numpy seeds: 0 .. 2^32 - 1 keeps every generator (and seed + 1) in range
SEED = _range(0, 2**32 - 1)
# Widths of layers and of z: far beyond any VAE, yet small enough that torch can size every
# weight (larger ones overflow its int64 shapes); memory is checked against the real model.
MAX_WIDTH = 2**20


# No defaults here: params.yaml is the one place where every key has its value (and its unit
# and meaning in a comment). A key missing from it is an error, never a silent fallback.


@dataclass
class DataConfig:
    dataset: str = field(metadata=_choice(*DATASETS))
    root: str = field(metadata={})
    npz_path: str = field(metadata={})
    download: bool = field(metadata={})
    mirror: str = field(metadata={})
    val_fraction: float = field(metadata=_range(0, 1, lo_open=True, hi_open=True))
    binarize: str = field(metadata=_choice(*BINARIZE))
    seed: int = field(metadata=SEED)


@dataclass
class ModelConfig:
    arch: str = field(metadata=_choice(*ARCHS))
    hidden: list = field(metadata={"item": int})
    channels: list = field(metadata={"item": int})
    latent_dim: int = field(metadata=_range(1, MAX_WIDTH))
    likelihood: str = field(metadata=_choice(*LIKELIHOODS))
    gaussian_sigma: float = field(metadata=_range(0, lo_open=True))
    learn_sigma: bool = field(metadata={})
    min_sigma: float = field(metadata=_range(0, lo_open=True))
    prior: str = field(metadata=_choice(*PRIORS))
    prior_components: int = field(metadata=_range(1, 10_000))
    z1_dim: int = field(metadata=_range(1, MAX_WIDTH))
    conditional: bool = field(metadata={})
    activation: str = field(metadata=_choice(*ACTIVATIONS))


@dataclass
class TrainConfig:
    epochs: int = field(metadata=_range(1))
    batch_size: int = field(metadata=_range(1))
    lr: float = field(metadata=_range(0, lo_open=True))
    objective: str = field(metadata=_choice(*OBJECTIVES))
    iwae_k: int = field(metadata=_range(1, 10_000))
    iwae_gradient: str = field(metadata=_choice(*IWAE_GRADIENTS))
    beta: float = field(metadata=_range(0))
    warmup_epochs: int = field(metadata=_range(0))
    free_bits: float = field(metadata=_range(0))
    lr_schedule: str = field(metadata=_choice(*LR_SCHEDULES))
    lr_min: float = field(metadata=_range(0))
    lr_patience: int = field(metadata=_range(1))
    lr_factor: float = field(metadata=_range(0, 1, lo_open=True, hi_open=True))
    early_stopping: int = field(metadata=_range(0))
    image_every: int = field(metadata=_range(0))
    seed: int = field(metadata=SEED)
    device: str = field(metadata=_choice(*DEVICES))
    threads: int = field(metadata=_range(0))
    precision: str = field(metadata=_choice(*PRECISIONS))
    resume: bool = field(metadata={})
    # torchrun launched by the stage itself (distributed.launch) when nproc * nnodes > 1
    nproc: int = field(metadata=_range(1, 1024))
    nnodes: int = field(metadata=_range(1, 1024))
    node_rank: int = field(metadata=_range(0, 1023))
    rdzv_endpoint: str = field(metadata={})


@dataclass
class EvaluateConfig:
    # [k, batch, pixels] samples at once; beyond 1e5 per image it no longer fits in memory
    iwae_k: int = field(metadata=_range(1, 100_000))
    iwae_n: int = field(metadata=_range(0))
    batch_size: int = field(metadata=_range(1))
    seed: int = field(metadata=SEED)
    # a grid of more images is unreadable (and the worst-reconstruction picture decodes them all)
    n_images: int = field(metadata=_range(1, 1024))
    active_threshold: float = field(metadata=_range(0, lo_open=True))
    probe_train_size: int = field(metadata=_range(0))
    knn_k: int = field(metadata=_range(1))
    traversal_dims: int = field(metadata=_range(1))
    ood_n: int = field(metadata=_range(1))
    fid_n: int = field(metadata=_range(2))


@dataclass
class ClassifierConfig:
    epochs: int = field(metadata=_range(1))
    batch_size: int = field(metadata=_range(1))
    lr: float = field(metadata=_range(0, lo_open=True))
    seed: int = field(metadata=SEED)


@dataclass
class ExportConfig:
    # torch's exporter writes opset 18 and up (lower ones silently come out as 18);
    # onnxruntime 1.31 loads up to 26 (and newer opsets fall back to 18 in the converter)
    opset: int = field(metadata=_range(18, 26))
    parity_atol: float = field(metadata=_range(0, lo_open=True))
    fp16_parity_atol: float = field(metadata=_range(0, lo_open=True))
    int8_parity_atol: float = field(metadata=_range(0, lo_open=True))
    provider: str = field(metadata=_choice(*PROVIDERS))
    encoder_model: str = field(metadata={})
    decoder_model: str = field(metadata={})
    scorer_model: str = field(metadata={})
    serve_max_batch: int = field(metadata=_range(1))
    # [k, batch, pixels] floats per call: more than 1e4 samples an image is a benchmark, not a
    # deployment
    scorer_k: int = field(metadata=_range(1, 10_000))
    scorer_seed: int = field(metadata=SEED)
    scorer_max_batch: int = field(metadata=_range(1))


@dataclass
class MlflowConfig:
    experiment: str = field(metadata={"nonempty": True})


@dataclass
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    classifier: ClassifierConfig
    export: ExportConfig
    mlflow: MlflowConfig


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "classifier": ClassifierConfig,
    "export": ExportConfig,
    "mlflow": MlflowConfig,
}
KINDS = {"bool": bool, "int": int, "float": float, "str": str, "list": list}


def _show(value: Any, limit: int = 80) -> str:
    """repr for a message: cut when long (a pasted array), safe for ints of any size."""
    try:
        text = repr(value)
    except ValueError:  # int too large to print (sys.set_int_max_str_digits)
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _check_model(p: Params) -> None:
    """Combinations of model and data params that make no sense."""
    m = p.model
    if m.likelihood == "bernoulli" and p.data.binarize == "none":
        raise ConfigError(
            "param 'data.binarize' = 'none' does not fit 'model.likelihood' = 'bernoulli' "
            "(a Bernoulli likelihood needs binary pixels); use binarize dynamic/static, "
            "or likelihood gaussian for grey-level pixels"
        )
    if m.likelihood == "continuous_bernoulli" and p.data.binarize != "none":
        raise ConfigError(
            "param 'model.likelihood' = 'continuous_bernoulli' is a density for grey-level "
            f"pixels in [0, 1], but 'data.binarize' = '{p.data.binarize}'; set binarize none"
        )
    if m.learn_sigma and m.likelihood != "gaussian":
        raise ConfigError(
            f"param 'model.learn_sigma' = true needs 'model.likelihood' = 'gaussian' "
            f"(it is '{m.likelihood}')"
        )
    if m.learn_sigma and m.min_sigma >= m.gaussian_sigma:
        raise ConfigError(
            f"param 'model.min_sigma' = {m.min_sigma} must be smaller than "
            f"'model.gaussian_sigma' = {m.gaussian_sigma} (where a learned std starts)"
        )
    if m.arch == "conv" and not m.channels:
        raise ConfigError(
            "param 'model.channels' must list at least one width for 'model.arch' = 'conv'"
        )
    if m.arch in HIERARCHICAL_ARCHS and not m.hidden:
        raise ConfigError(
            f"param 'model.hidden' must list at least one width for 'model.arch' = '{m.arch}' "
            "(the layers between z1 and z2 have the last one)"
        )
    if m.prior != "standard" and p.train.free_bits > 0:
        raise ConfigError(
            f"param 'train.free_bits' = {p.train.free_bits} needs the per-dim KL of "
            f"'model.prior' = 'standard'; the {m.prior} prior's KL is a single-sample estimate "
            "with no per-dim split; set free_bits to 0"
        )
    _check_options(p)


def _check_options(p: Params) -> None:
    """The model options of issue 17 against each other and the training objective."""
    m = p.model
    if m.conditional and m.arch == "conv":
        raise ConfigError(
            "param 'model.conditional' = true is not supported with 'model.arch' = 'conv' "
            "(the label joins the dense layers of mlp and the hvaes); use arch mlp, hvae or "
            "hvae_topdown"
        )
    if m.conditional and m.prior == "vamp":
        raise ConfigError(
            "param 'model.conditional' = true does not fit 'model.prior' = 'vamp': its "
            "pseudo-inputs would need labels too; use prior standard or mog"
        )
    if m.arch in HIERARCHICAL_ARCHS and p.train.iwae_gradient == "dreg":
        raise ConfigError(
            f"param 'train.iwae_gradient' = 'dreg' is for one stochastic layer, not "
            f"'model.arch' = '{m.arch}' (one layer's q depends on the other layer's "
            "sample, whose path DReG would have to keep while stopping q's parameters); use "
            "arch mlp or conv, or iwae_gradient standard"
        )
    if m.arch in HIERARCHICAL_ARCHS and p.train.free_bits > 0:
        raise ConfigError(
            f"param 'train.free_bits' = {p.train.free_bits} does not apply to 'model.arch' = "
            f"'{m.arch}' (its KL has no closed-form per-dim split); set free_bits to 0"
        )


def _check_train(t: TrainConfig) -> None:
    """Training options that do not go together."""
    if t.objective == "iwae":
        for key, value, neutral in (
            ("beta", t.beta, 1.0),
            ("warmup_epochs", t.warmup_epochs, 0),
            ("free_bits", t.free_bits, 0.0),
        ):
            if value != neutral:
                raise ConfigError(
                    f"param 'train.{key}' = {value} does not apply to 'train.objective' = "
                    f"'iwae' (the IWAE bound has no separate KL term); set it to {neutral}"
                )
    if t.iwae_gradient == "dreg" and t.objective != "iwae":
        raise ConfigError(
            f"param 'train.iwae_gradient' = 'dreg' needs 'train.objective' = 'iwae' (it is "
            f"'{t.objective}'); DReG is a gradient of the IWAE bound"
        )
    if t.lr_schedule != "constant" and t.lr_min >= t.lr:
        raise ConfigError(
            f"param 'train.lr_min' = {t.lr_min} must be smaller than 'train.lr' = {t.lr} "
            f"for lr_schedule '{t.lr_schedule}'"
        )
    _check_launch(t)


_ENDPOINT = re.compile(r"(?P<host>[^\s:\[\]]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")


def _check_launch(t: TrainConfig) -> None:
    """The torchrun params: a node rank within the nodes, a rendezvous for several nodes."""
    if t.node_rank >= t.nnodes:
        raise ConfigError(
            f"param 'train.node_rank' = {t.node_rank} must be below 'train.nnodes' = "
            f"{t.nnodes} (nodes are numbered 0 .. nnodes - 1)"
        )
    endpoint = t.rdzv_endpoint.strip()
    if t.nnodes > 1 and not endpoint:
        raise ConfigError(
            f"param 'train.nnodes' = {t.nnodes} needs 'train.rdzv_endpoint' = 'host:port', "
            "an address of node 0 that every node reaches (e.g. 10.0.0.1:29500)"
        )
    if endpoint:
        m = _ENDPOINT.fullmatch(endpoint)
        if not m or not 1 <= int(m["port"]) <= 65535:
            raise ConfigError(
                f"param 'train.rdzv_endpoint' = {_show(t.rdzv_endpoint)} must be 'host:port' "
                'with a port in 1..65535 (e.g. 10.0.0.1:29500), or "" for one machine'
            )


def _check_cross(p: Params) -> None:
    _check_model(p)
    _check_train(p.train)
    if p.data.dataset == "npz" and not p.data.npz_path:
        raise ConfigError(
            "param 'data.npz_path' must name a .npz file when 'data.dataset' = 'npz'"
        )
    ev = p.evaluate
    if ev.probe_train_size and ev.knn_k >= ev.probe_train_size:
        raise ConfigError(
            f"param 'evaluate.knn_k' = {ev.knn_k} must be smaller than "
            f"'evaluate.probe_train_size' = {ev.probe_train_size} (the points it votes among)"
        )


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
    _check_cross(params)
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
