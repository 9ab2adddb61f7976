"""p(x|z): the likelihood of an image given the decoder's logits (natural parameters), in nats.

`Likelihood` is what the loss, the evaluation and the exported graphs ask of p(x|z): `nll(x,
logits)`, -log p(x|z) per example summed over the pixels, and `mean(logits)`, E[x|z]. Every
kind is a proper log-probability (bernoulli, on binary x) or log-density (gaussian and
continuous_bernoulli, on x in [0, 1]) in nats, so runs of one kind compare. Not a pixel-averaged
MSE: that would weight the KL ~784x too much (the seed tutorial's trap).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vaepipe.model.gaussian import LOG_2PI

KINDS = ("bernoulli", "gaussian", "continuous_bernoulli")


class Likelihood:
    """p(x|z) of one kind; `sigma`: the Gaussian's std, a float or one per pixel [C, H, W]
    (a learned one: a tensor in the graph of the loss)."""

    def __init__(self, kind: str, sigma: float | torch.Tensor | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown likelihood {kind!r}")
        if kind == "gaussian" and sigma is None:
            raise ValueError("the gaussian likelihood needs its std sigma")
        self.kind, self.sigma = kind, sigma

    def nll(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) per example, summed over pixels: [...] for logits [..., C, H, W]."""
        if self.kind == "bernoulli":
            nll = bernoulli_nll(logits, x)
        elif self.kind == "gaussian":
            sigma = self.sigma
            log_sigma = torch.log(sigma) if isinstance(sigma, torch.Tensor) else math.log(sigma)
            nll = 0.5 * ((x - torch.sigmoid(logits)) / sigma) ** 2 + log_sigma + 0.5 * LOG_2PI
        else:
            nll = -(logits * x + cb_log_norm(logits))
        return nll.flatten(-3).sum(-1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """E[x|z] of the decoder's logits."""
        return mean(self.kind, logits)


def mean(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """E[x|z] of likelihood `kind`: sigmoid for bernoulli and gaussian (means kept in [0, 1]);
    the continuous Bernoulli's mean is not the sigmoid of its logits. The std of a Gaussian
    plays no part: decoder.onnx holds no sigma."""
    if kind == "continuous_bernoulli":
        return cb_mean(logits)
    return torch.sigmoid(logits)


def _exporting() -> bool:
    """Inside torch.onnx's trace (or torch.export): ops ONNX lacks are spelled out."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _expm1(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1, torch's exact kernel; exp(x) - 1 as written in an exported graph (ONNX has
    no Expm1). Callers keep |x| >= 0.5, where the two differ by a float32 rounding."""
    return torch.exp(x) - 1 if _exporting() else torch.expm1(x)


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(x; sigmoid(logits)) elementwise, = softplus(l) - x l, with no exp that
    overflows and no log that meets 0 for any logit. In PyTorch that is BCE-with-logits, one
    fused kernel each way; in an exported graph it is spelled out, because ONNX exports
    F.binary_cross_entropy_with_logits as log(sigmoid(l)), which is -inf once sigmoid
    underflows (a saturated pixel of a trained decoder)."""
    if _exporting():
        return logits.clamp_min(0) + torch.log1p(torch.exp(-logits.abs())) - x * logits
    logits, x = torch.broadcast_tensors(logits, x)  # K samples [K, B, ...] of x [B, ...]
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none")


# Below |eta| < this the closed forms of the continuous Bernoulli cancel catastrophically in
# float32; their Taylor series (error < 1e-7 there) take over.
_CB_TAYLOR = 0.5


def cb_log_norm(eta: torch.Tensor) -> torch.Tensor:
    """log C(eta) of the continuous Bernoulli p(x) = C exp(eta x) on [0, 1], eta = logit(lambda).

    C = eta / (e^eta - 1) (Loaiza-Ganem & Cunningham 2019, in natural-parameter form); written
    as log|eta| - max(eta, 0) - log(1 - e^-|eta|) so no exp overflows.
    """
    small = eta.abs() < _CB_TAYLOR
    safe = torch.where(small, torch.ones_like(eta), eta)  # no log(0) feeding a NaN gradient
    a = safe.abs()
    exact = torch.log(a) - safe.clamp_min(0) - torch.log(-_expm1(-a))
    e2 = eta * eta  # log C = -eta/2 + log(s / sinh s), s = eta/2, expanded in s
    series = -eta / 2 - e2 / 24 + e2 * e2 / 2880 - e2 * e2 * e2 / 90720
    return torch.where(small, series, exact)


def cb_mean(eta: torch.Tensor) -> torch.Tensor:
    """E[x] of the continuous Bernoulli with natural parameter eta: 1/(1 - e^-eta) - 1/eta."""
    small = eta.abs() < _CB_TAYLOR
    safe = torch.where(small, torch.ones_like(eta), eta)
    a = safe.abs()  # mean(-eta) = 1 - mean(eta): only e^-|eta| is ever formed, no overflow
    upper = -1.0 / _expm1(-a) - 1.0 / a
    exact = torch.where(safe > 0, upper, 1.0 - upper)
    e2 = eta * eta
    series = 0.5 + eta / 12 - eta * e2 / 720 + eta * e2 * e2 / 30240
    return torch.where(small, series, exact)
