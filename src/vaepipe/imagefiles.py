"""Images and arrays on disk for the `vaepipe` command: PNG grids, .npz files, PNG folders.

numpy and the standard library only (PNGs are written with zlib; reading a folder of PNGs uses
Pillow, which matplotlib already brings), so the CLI starts without torch or matplotlib.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from vaepipe.errors import DataError, VaepipeError
from vaepipe.fileio import atomic_path


def png_bytes(img: np.ndarray) -> bytes:
    """An 8-bit PNG of `img` uint8 [H, W] (grey) or [H, W, 3] (RGB); filter 0 on every row."""
    h, w = img.shape[:2]
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if img.ndim == 2 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def grid(x: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """Images x [N, C, H, W] in [0, 1] tiled row by row into uint8 [rows*(H+pad)+pad, ...]."""
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise DataError(f"cannot draw images with {c} channels as PNG (1 or 3 needed)")
    rows = -(-n // cols)
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    img = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    return img[..., 0] if c == 1 else img


def write_file(path: Path, data: bytes | dict[str, np.ndarray]) -> None:
    try:
        with atomic_path(path) as tmp:
            if isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                with open(tmp, "wb") as f:
                    np.savez(f, **data)
    except OSError as e:
        raise VaepipeError(f"cannot write {path}: {e.strerror or e}") from None


def save_images(out: Path, x: np.ndarray, cols: int, arrays: dict[str, np.ndarray]) -> None:
    """A PNG grid of x [N, C, H, W] or an .npz with x_mean and `arrays`, by out's suffix."""
    if out.suffix == ".png":
        write_file(out, png_bytes(grid(x, cols)))
    else:
        write_file(out, {**arrays, "x_mean": x})


def load_npz(path: Path, keys: tuple[str, ...]) -> tuple[str, np.ndarray, dict]:
    """(key, array) for the first of `keys` in the .npz at `path`, and all its arrays."""
    from vaepipe.data import read_npz  # no heavier imports at CLI start-up than needed

    arrays = read_npz(path, "file")
    for k in keys:
        if k in arrays:
            return k, arrays[k], arrays
    raise DataError(f"{path} has arrays {sorted(arrays)}; expected one named {' or '.join(keys)}")


def read_png_folder(folder: Path, shape: tuple) -> tuple[np.ndarray, list[str]]:
    """PNGs in `folder` (sorted by name) as float32 [N, C, H, W] in [0, 1], with their names."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"{folder} holds no .png files")
    c, h, w = shape
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        raise DataError(f"the encoder takes {c}-channel images; PNG folders hold 1 or 3")
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except OSError as e:
            raise DataError(f"{p} is not a readable PNG: {e}") from None
        if arr.shape[:2] != (h, w):
            raise DataError(
                f"{p} is {arr.shape[1]}x{arr.shape[0]} pixels; the encoder takes {w}x{h}"
            )
        images.append(arr.reshape(h, w, c).transpose(2, 0, 1))
    return np.stack(images), [p.name for p in files]


def images_from_npz(path: Path, shape: tuple) -> tuple[np.ndarray, dict]:
    """x [N, H, W] or [N, C, H, W], uint8 0..255 or floats in [0, 1] -> float32 [N, C, H, W]."""
    _, x, arrays = load_npz(path, ("x",))
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3 and shape[0] == 1:
        x = x[:, None]
    extra = {"y": arrays["y"]} if "y" in arrays else {}
    return x, extra
