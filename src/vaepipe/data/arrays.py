"""Image arrays as the pipeline holds them: the Split (images and labels), their checks, .npz
files read without pickles and within memory, the prepared files of the prepare stage, the
content digest, and the conversions to model input (float32 in [0, 1], binarized draws).

Images are uint8 0..255 (IDX sources) or float32 in [0, 1] (digits, npz floats), shape
[N, C, H, W]. numpy only: torch tensors are handled through their own methods, so the prepare
stage and the CLI never import torch.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaepipe import limits
from vaepipe.errors import DataError
from vaepipe.fileio import atomic_path


@dataclass
class Split:
    x: np.ndarray  # [N, C, H, W] uint8 0..255 or float32 in [0, 1]
    y: np.ndarray | None  # [N] int64 labels, or None when the source has none


def validate_images(x: np.ndarray, source: str) -> np.ndarray:
    """Accept [N,H,W] or [N,C,H,W]; uint8/ints in 0..255 or floats in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{source}: images have shape {x.shape}; expected [N, H, W] or [N, C, H, W]"
        )
    if x.shape[0] == 0:
        raise DataError(f"{source}: the dataset is empty (0 images)")
    if min(x.shape[1:]) < 1:
        raise DataError(f"{source}: images have an empty dimension, shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "iu":  # not issubdtype(integer): that admits timedelta64
        if x.min() < 0 or x.max() > 255:
            raise DataError(
                f"{source}: integer pixels must lie in 0..255, found {x.min()}..{x.max()}"
            )
        return x.astype(np.uint8)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise DataError(f"{source}: images contain NaN or Inf")
        if x.min() < 0 or x.max() > 1:
            raise DataError(
                f"{source}: float pixels must lie in [0, 1], found {x.min():g}..{x.max():g} "
                "(store uint8 0..255 or scale to [0, 1])"
            )
        return x.astype(np.float32)
    raise DataError(f"{source}: images have dtype {x.dtype}; expected uint8 or float")


# labels are class numbers: the classifier and a conditional model size a layer by them
MAX_CLASSES = 10_000


def check_labels(y: np.ndarray | None, n: int, source: str) -> np.ndarray | None:
    if y is None:
        return None
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DataError(
            f"{source}: labels 'y' must be integers of shape ({n},), got {y.dtype} {y.shape}"
        )
    if len(y) and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise DataError(
            f"{source}: labels 'y' must be class numbers 0 .. {MAX_CLASSES - 1}, "
            f"got {y.min()} .. {y.max()}"
        )
    return y.astype(np.int64)


def read_npz(path: Path, what: str = "npz file") -> dict[str, np.ndarray]:
    """Every array of the .npz at `path` (no pickles); DataError for anything else."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy holds one unnamed array
            raise DataError(
                f"{path} is a .npy file (one unnamed array), not an .npz with named arrays; "
                "save it with np.savez(path, x=images)"
            )
        with f:
            limits.check_bytes(f"{what} {path}", _npz_nbytes(f), "split it into smaller files")
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a directory, not an .npz file") from None
    except ValueError as e:
        # numpy's own words ("contains pickled data... load it unsafely") invite allow_pickle
        why = (
            "it holds Python object arrays, which are refused (no pickles)"
            if "Object arrays" in str(e)
            else "not an archive of arrays as np.savez writes"
            if "pickled" in str(e)
            else str(e)
        )
        raise DataError(f"{path} is not a readable .npz file: {why}") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None
    not_arrays = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if not_arrays:  # a zip whose members are not .npy files
        raise DataError(f"{path}: members {not_arrays} are not numpy arrays (.npy)")
    return arrays


def _npz_nbytes(f) -> int:
    """Bytes the arrays of an open NpzFile take once loaded, from their .npy headers alone."""
    total = 0
    for member in f.zip.namelist():
        try:
            with f.zip.open(member) as fp:
                version = np.lib.format.read_magic(fp)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read(fp)
        except Exception:  # noqa: BLE001 - not an .npy member: loading it says what is wrong
            continue
        total += math.prod(shape) * dtype.itemsize
    return total


# --- prepared files ------------------------------------------------------------------------------


def save_split(path: str | Path, split: Split) -> None:
    arrays = {"x": split.x}
    if split.y is not None:
        arrays["y"] = split.y
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_split(path: str | Path) -> Split:
    path = Path(path)
    if not path.exists():
        raise DataError(f"prepared data {path} is missing; run the prepare stage (dvc repro)")
    try:
        arrays = read_npz(path, "prepared data")
    except DataError as e:
        raise DataError(f"{e}; rerun the prepare stage (dvc repro -f -s prepare)") from None
    if "x" not in arrays:
        raise DataError(f"prepared data {path} has no 'x'; rerun the prepare stage")
    x, y = arrays["x"], arrays.get("y")
    return Split(validate_images(x, str(path)), check_labels(y, len(x), str(path)))


def digest(split: Split) -> str:
    """16 hex digits of the SHA-256 of a split's images and labels (dtype, shape and bytes):
    the same data gives the same digest on every machine, whatever file it came from."""
    h = hashlib.sha256()
    for name, arr in (("x", split.x), ("y", split.y)):
        if arr is not None:
            h.update(f"{name} {arr.dtype.str} {arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()[:16]


def binarize(x, generator):
    """One Bernoulli draw per pixel with p = intensity (the dynamic-binarization standard), for
    a torch tensor x in [0, 1] and a torch.Generator on its device."""
    return x.bernoulli(generator=generator)


def to_unit(x: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] from uint8 0..255 or float32 [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32, copy=False)
