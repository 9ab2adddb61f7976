"""Combinations of params that make no sense, each refused before any work with one line that
says why and what to do (the checks of single values are in vaepipe.config)."""

from __future__ import annotations

import re

from vaepipe.config.schema import HIERARCHICAL_ARCHS, Params, TrainConfig
from vaepipe.errors import ConfigError


def show(value, limit: int = 80) -> str:
    """repr for a message: cut when long (a pasted array), safe for ints of any size."""
    try:
        text = repr(value)
    except ValueError:  # int too large to print (sys.set_int_max_str_digits)
        text = f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if m.arch in ("conv", "convhvae") and not m.channels:
        raise ConfigError(
            f"param 'model.channels' must list at least one width for 'model.arch' = '{m.arch}'"
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
    """The model options (arch, prior, conditional) against each other and the objective."""
    m = p.model
    if m.conditional and m.arch in ("conv", "convhvae"):
        raise ConfigError(
            f"param 'model.conditional' = true is not supported with 'model.arch' = '{m.arch}' "
            "(the label joins the dense layers of mlp and the hvaes); use arch mlp, hvae or "
            "hvae_topdown"
        )
    if m.conditional and m.prior in ("vamp", "exemplar"):
        what = "pseudo-inputs" if m.prior == "vamp" else "exemplars"
        raise ConfigError(
            f"param 'model.conditional' = true does not fit 'model.prior' = '{m.prior}': its "
            f"{what} would need labels too; use prior standard or mog"
        )
    if m.prior == "exemplar":
        _check_exemplar(p)
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


def _check_exemplar(p: Params) -> None:
    """The Exemplar prior draws a step's exemplars in the one training process, eagerly."""
    t, components = p.train, p.model.prior_components
    if components < 2:
        raise ConfigError(
            f"param 'model.prior_components' = {components} is too few exemplars a step for "
            "'model.prior' = 'exemplar' (each example's own image is left out of its prior); "
            "use 2 or more"
        )
    if t.nproc * t.nnodes > 1:
        raise ConfigError(
            f"param 'model.prior' = 'exemplar' trains in one process, not nproc x nnodes = "
            f"{t.nproc * t.nnodes} (each step's exemplars are drawn outside the model's "
            "forward pass); set nproc and nnodes to 1"
        )
    if t.compile != "none":
        raise ConfigError(
            f"param 'train.compile' = '{t.compile}' does not take 'model.prior' = 'exemplar' "
            "(each step draws new exemplars outside the compiled graph); set compile to none"
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
    _check_compile(t)


def _check_compile(t: TrainConfig) -> None:
    """torch.compile takes the step of one process whose gradient has no hook."""
    if t.compile == "none":
        return
    if t.nproc * t.nnodes > 1:
        raise ConfigError(
            f"param 'train.compile' = '{t.compile}' is for one training process, not "
            f"nproc x nnodes = {t.nproc * t.nnodes}; set it to none"
        )
    if t.objective == "iwae" and t.iwae_gradient == "dreg":
        raise ConfigError(
            f"param 'train.compile' = '{t.compile}' does not take 'train.iwae_gradient' = "
            "'dreg' (its gradient hook runs outside a compiled graph); use standard, or "
            "compile none"
        )


ENDPOINT = re.compile(r"(?P<host>[^\s:\[\]]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")


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
        m = ENDPOINT.fullmatch(endpoint)
        if not m or not 1 <= int(m["port"]) <= 65535:
            raise ConfigError(
                f"param 'train.rdzv_endpoint' = {show(t.rdzv_endpoint)} must be 'host:port' "
                'with a port in 1..65535 (e.g. 10.0.0.1:29500), or "" for one machine'
            )


def check_combinations(p: Params) -> None:
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
