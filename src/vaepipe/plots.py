"""Pictures as PNG files: image grids (matplotlib only for writing the file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vaepipe.fileio import atomic_path


def image_grid(images: np.ndarray, ncols: int = 8, pad: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] images in [0, 1] into one [H', W'] (C=1) or [H', W', C] array."""
    n, c, h, w = images.shape
    nrows = -(-n // ncols)
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = np.transpose(img, (1, 2, 0))
    return grid[..., 0] if c == 1 else grid


def save_png(path: str | Path, grid: np.ndarray, scale: int = 3) -> None:
    """Write an image array in [0, 1] as a PNG, upscaled by pixel repetition for legibility."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = np.clip(grid, 0, 1).repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, big, cmap="gray", vmin=0, vmax=1, format="png")


def interleave_rows(top: np.ndarray, bottom: np.ndarray, ncols: int = 8) -> np.ndarray:
    """Rows of `top` followed by the matching rows of `bottom` (inputs above reconstructions)."""
    rows = []
    for i in range(0, len(top), ncols):
        rows += [top[i : i + ncols], bottom[i : i + ncols]]
    return np.concatenate(rows)
