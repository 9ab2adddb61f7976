"""Pictures as PNG files: titled image grids and matplotlib charts, from arrays only.

Nothing here touches the model: callers decode images and compute figures, these functions draw
them. matplotlib is imported inside the functions (Agg backend) so importing vaepipe stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vaepipe import imagefiles
from vaepipe.fileio import atomic_path

# Legend names for datasets whose labels have a published meaning; others show the label ids.
CLASS_NAMES = {
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def save_grid(
    path: str | Path,
    images: np.ndarray,
    title: str,
    ncols: int = 8,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: float = 3.0,
) -> None:
    """[N, C, H, W] images in [0, 1] as a titled grid, optionally with row/column labels."""
    plt = _pyplot()
    _, _, h, w = images.shape
    pad = max(1, h // 14)
    grid = np.clip(imagefiles.grid(images, ncols, pad), 0, 1)
    # Small images (8x8 digits) are drawn bigger so the grid stays legible next to the title.
    scale = scale * max(1.0, 28 / max(h, w))
    size = (grid.shape[1] * scale / DPI, grid.shape[0] * scale / DPI)
    fig, ax = plt.subplots(figsize=(max(size[0], 4.0), size[1] + 0.4))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([pad + (w + pad) * i + w / 2 for i in range(len(col_labels or []))])
    ax.set_xticklabels(col_labels or [], fontsize=7)
    ax.set_yticks([pad + (h + pad) * i + h / 2 for i in range(len(row_labels or []))])
    ax.set_yticklabels(row_labels or [], fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    _save(fig, path)


def training_curves(path: str | Path, curves: list[dict]) -> None:
    """Every ELBO term per epoch, train beside validation, from plots/train/curves.json rows."""
    plt = _pyplot()
    panels = [
        ("ELBO (nats, higher is better)", ["train_elbo", "val_elbo"]),
        ("Reconstruction NLL -log p(x|z) (nats)", ["train_recon", "val_recon"]),
        ("KL(q(z|x) || p(z)) (nats)", ["train_kl", "val_kl"]),
        ("Loss = recon + beta * KL (nats)", ["train_loss"]),
    ]
    epochs = [row["epoch"] for row in curves]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            if all(key in row for row in curves):
                ax.plot(epochs, [row[key] for row in curves], marker=".", label=key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle("Training curves: every ELBO term per epoch")
    _save(fig, path)


def latent_scatter(
    path: str | Path,
    xy: np.ndarray,
    labels: np.ndarray | None,
    *,
    title: str,
    axis_names: tuple[str, str],
    class_names: Sequence[str] | None = None,
) -> None:
    """Test latents in 2-D ([N, 2]), one colour per label (or one colour without labels)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.5, color="tab:blue")
    else:
        cmap = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
        for i, c in enumerate(np.unique(labels)):
            sel = labels == c
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=name)
        ax.legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)


def kl_per_dim_bars(
    path: str | Path,
    kl: np.ndarray,
    activity: np.ndarray,
    threshold: float,
    *,
    dims: np.ndarray | None = None,
    of: int | None = None,
) -> None:
    """Per-dimension KL bars above per-dimension activity Cov_x(E_q[z_u]) with its threshold;
    `dims`: which dims these are, when a chart shows some of `of`."""
    plt = _pyplot()
    of = of or len(kl)
    slots = np.arange(len(kl))
    active = activity > threshold
    colours = np.where(active, "tab:blue", "tab:gray")
    width = min(max(6, 0.25 * len(kl) + 2), 40)  # inches: the chart has a bounded size
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6), sharex=True)
    top.bar(slots, kl, color=colours)
    top.set_ylabel("KL (nats)")
    which = "" if len(kl) == of else f" (the {len(kl)} of {of} dims with the most KL)"
    top.set_title(
        f"Per-dimension KL(q(z_d|x) || N(0,1)), test mean, {kl.sum():.2f} nats summed over "
        f"these dims; {int(active.sum())}/{len(kl)} active{which} (grey = inactive)",
        fontsize=10,
    )
    if dims is not None and len(kl) != of and len(kl) <= 64:
        top.set_xticks(slots, [str(d) for d in dims], fontsize=7, rotation=90)
    bottom.bar(slots, np.maximum(activity, 1e-12), color=colours)
    bottom.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    bottom.set_yscale("log")
    bottom.set_ylabel("Cov_x(E_q[z_d])")
    bottom.set_xlabel("latent dimension d")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
