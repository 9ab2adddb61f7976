"""Images and arrays on disk: image grids, PNG files (Pillow), .npz files, PNG folders.

numpy, Pillow and the standard library only, so the CLI starts without torch or matplotlib. The
one image-grid function of the project lives here: the evaluate pictures (plots.py), the
per-epoch grids of the train stage and `vaepipe generate` all tile images with it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vaepipe import limits
from vaepipe.errors import DataError
from vaepipe.fileio import output_path


def grid(x: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """Images x [N, C, H, W] in [0, 1] tiled row by row on a white canvas, `pad` pixels apart:
    float32 [rows*(H+pad)+pad, cols*(W+pad)+pad] for C = 1, with a last axis of 3 for C = 3."""
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise DataError(f"cannot draw images with {c} channels (1 or 3 needed)")
    rows = -(-n // cols)
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    return canvas[..., 0] if c == 1 else canvas


def interleave_rows(top: np.ndarray, bottom: np.ndarray, ncols: int = 8) -> np.ndarray:
    """Rows of `top` followed by the matching rows of `bottom` (inputs above reconstructions)."""
    rows = []
    for i in range(0, len(top), ncols):
        rows += [top[i : i + ncols], bottom[i : i + ncols]]
    return np.concatenate(rows)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as 8-bit values (rounded, clipped)."""
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """An 8-bit PNG of `img` in [0, 1]: [H, W] (grey) or [H, W, 3] (RGB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    return buf.getvalue()


def write_file(path: Path, data: bytes | dict[str, np.ndarray]) -> None:
    with output_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **data)


GRID_PAD = 2
READABLE = 96  # px: the default scale draws each image at least this wide (nearest neighbour)
LABEL_WIDTH = 60  # px: the margin that names the rows of a labelled grid


def check_grid(what: str, n: int, cols: int, image_shape, scale: int = 1) -> None:
    """A grid of n images of image_shape (C, H, W), drawn `scale` times larger, that a PNG can
    hold, or SizeError."""
    h, w = image_shape[-2:]
    limits.check_png_grid(what, n, cols, (h * scale, w * scale), GRID_PAD * scale)


def readable_scale(n: int, cols: int, image_shape) -> int:
    """The scale that draws each image READABLE px wide or more, smaller where the grid would
    not fit a PNG (1 at least: check_grid says when even that is too large)."""
    h, w = image_shape[-2:]
    scale = max(1, -(-READABLE // max(h, w)))
    rows = -(-n // cols)
    while scale > 1 and (
        (rows * (h + GRID_PAD) + GRID_PAD) * (cols * (w + GRID_PAD) + GRID_PAD) * scale**2
        > limits.MAX_PNG_PIXELS
    ):
        scale -= 1
    return scale


def enlarged(img: np.ndarray, scale: int) -> np.ndarray:
    """`img` [H, W(, 3)] drawn `scale` times larger, each pixel a square (no smoothing)."""
    return img if scale == 1 else img.repeat(scale, axis=0).repeat(scale, axis=1)


def labelled(img: np.ndarray, labels: list[str], pitch: int, top: int) -> np.ndarray:
    """`img` [H, W(, 3)] in [0, 1] with a white margin on the left naming its rows of images:
    labels[i % len(labels)] beside the i-th row, rows `pitch` px apart from `top`."""
    from PIL import Image, ImageDraw

    margin = np.ones((img.shape[0], LABEL_WIDTH, *img.shape[2:]), np.float32)
    canvas = Image.fromarray(to_uint8(np.concatenate([margin, img], axis=1)))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if canvas.mode == "L" else (0, 0, 0)
    for i, y in enumerate(range(top, img.shape[0] - pitch // 2, pitch)):
        draw.text((4, y + pitch // 2 - 5), labels[i % len(labels)], fill=ink)
    return np.asarray(canvas, np.float32) / 255.0


def picture(x: np.ndarray, cols: int, scale: int = 1, rows: list[str] | None = None) -> np.ndarray:
    """The grid of x [N, C, H, W], `scale` times larger, its rows named by `rows` (cycled)."""
    img = enlarged(grid(x, cols, GRID_PAD), scale)
    if rows:
        img = labelled(img, rows, (x.shape[2] + GRID_PAD) * scale, GRID_PAD * scale)
    return img


def save_images(out: Path, x: np.ndarray, cols: int, arrays: dict[str, np.ndarray],
                scale: int = 1, rows: list[str] | None = None) -> None:  # fmt: skip
    """A PNG grid of x [N, C, H, W] (`scale` times larger, rows named by `rows`) or an .npz
    with x_mean and `arrays`, by out's suffix."""
    if out.suffix == ".png":
        check_grid("the grid", len(x), cols, x.shape[1:], scale)
        write_file(out, png_bytes(picture(x, cols, scale, rows)))
    else:
        write_file(out, {**arrays, "x_mean": x})


def load_npz(path: Path, keys: tuple[str, ...]) -> tuple[str, np.ndarray, dict]:
    """(key, array) for the first of `keys` in the .npz at `path`, and all its arrays."""
    from vaepipe.data.arrays import read_npz  # no heavier imports at CLI start-up than needed

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
    limits.check_rows(f"the PNG files in {folder}", len(files), 4 * c * h * w)
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                # the size the header declares, checked before any pixel is decoded
                if im.size != (w, h):
                    raise DataError(
                        f"{p} is {im.size[0]}x{im.size[1]} pixels; the encoder takes {w}x{h}"
                    )
                arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except Image.DecompressionBombError as e:
            raise DataError(f"{p} is refused unread: {e}") from None
        except OSError as e:
            raise DataError(f"{p} is not a readable PNG: {e}") from None
        if arr.shape[:2] != (h, w):  # a file whose pixels are fewer than its header says
            raise DataError(f"{p} does not hold the {w}x{h} pixels its header declares")
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
