"""Where the images come from (`data.dataset`): Fashion-MNIST and MNIST IDX files (found in
data.root, the system dataset folder, or downloaded with checksums), scikit-learn's 8x8 digits,
or a user's npz; and the split into train, validation and test. numpy only."""

from __future__ import annotations

import gzip
import hashlib
import math
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from vaepipe.config import DataConfig
from vaepipe.data.arrays import Split, check_labels, read_npz, validate_images
from vaepipe.errors import DataError
from vaepipe.fileio import atomic_path

SYSTEM_DATASET_DIR = Path("/usr/share/datasets")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
MIRRORS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
# Accepted SHA-256 per file: of the published .gz, and of its decompressed IDX bytes (mirrors
# such as Debian's re-gzip the files, which changes the first but not the second).
SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train-labels-idx1-ubyte.gz": (
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "t10k-images-idx3-ubyte.gz": (
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            None,
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            None,
        ),
    },
}
IDX_DTYPES = {0x08: np.uint8}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{path} is not a valid gzip file (truncated or corrupt): {e}"
            ) from None
    return raw


def parse_idx(raw: bytes, source: str) -> np.ndarray:
    """Decode IDX bytes (magic 0x0000 <dtype> <ndim>, big-endian dims, data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{source} is not an IDX file of unsigned bytes (bad magic {raw[:4]!r})")
    ndim = raw[3]
    # numpy arrays have at most 32 (numpy 1) or 64 (numpy 2) dimensions; images need 1 to 4
    if ndim < 1 or ndim > 32 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{source}: IDX header is truncated or has {ndim} dimensions")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)  # a Python int: np.prod would overflow int64 and wrap
    if math.prod(d for d in dims if d) >= 2**48:  # numpy refuses even a 0-size array this big
        raise DataError(f"{source}: IDX header says shape {dims}, far too large to be images")
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise DataError(
            f"{source}: IDX header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(data)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def _candidate_dirs(name: str, root: Path) -> list[Path]:
    return [root / name, root, SYSTEM_DATASET_DIR / name]


def _has_all(d: Path) -> bool:
    return all((d / f).is_file() for f in IDX_FILES.values())


def verify_sha256(name: str, fname: str, blob: bytes, source: str) -> None:
    """Check downloaded bytes against the published digests (of the .gz, or of its content)."""
    gz_sha, raw_sha = SHA256[name][fname]
    digest = hashlib.sha256(blob).hexdigest()
    if digest == gz_sha:
        return
    try:
        content = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error):
        content = b""
    if raw_sha and hashlib.sha256(content).hexdigest() == raw_sha:
        return
    raise DataError(
        f"checksum mismatch for {source}: SHA-256 {digest} is not the published {gz_sha}"
    )


def download_idx(name: str, dest: Path, mirror: str = "") -> Path:
    """Download the four IDX files of `name` into `dest`, each verified before it is kept."""
    base = mirror or MIRRORS[name]
    if not base.endswith("/"):
        base += "/"
    dest.mkdir(parents=True, exist_ok=True)
    for fname in IDX_FILES.values():
        target = dest / fname
        if target.is_file():
            continue
        url = base + fname
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                blob = resp.read()
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
        verify_sha256(name, fname, blob, url)
        with atomic_path(target) as tmp:
            tmp.write_bytes(blob)
    return dest


def locate_idx(cfg: DataConfig) -> Path:
    """data.root, then the system dataset dir, then a verified download into data.root/<name>."""
    root = Path(cfg.root)
    for d in _candidate_dirs(cfg.dataset, root):
        if _has_all(d):
            return d
    tried = ", ".join(str(d) for d in _candidate_dirs(cfg.dataset, root))
    if not cfg.download:
        raise DataError(
            f"{cfg.dataset} IDX files ({', '.join(IDX_FILES.values())}) not found in {tried}, "
            "and data.download is false; put the files in data.root, install Debian's "
            f"dataset-{cfg.dataset} package, or set data.download: true"
        )
    try:
        return download_idx(cfg.dataset, root / cfg.dataset, cfg.mirror)
    except DataError as e:
        raise DataError(
            f"{cfg.dataset} not found: no IDX files in {tried}, and the download failed ({e}); "
            f"put the files in data.root, or install Debian's dataset-{cfg.dataset} package"
        ) from None


def load_idx_dataset(cfg: DataConfig) -> tuple[Split, Split]:
    d = locate_idx(cfg)
    arrays = {key: read_idx(d / fname) for key, fname in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{d}: {split} images {x.shape} and labels {y.shape} do not match "
                "(expected [N, H, W] and [N])"
            )
    x_train = validate_images(arrays["x_train"], str(d / IDX_FILES["x_train"]))
    x_test = validate_images(arrays["x_test"], str(d / IDX_FILES["x_test"]))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{d}: test images {x_test.shape[1:]} differ from train {x_train.shape[1:]}"
        )
    return (
        Split(x_train, arrays["y_train"].astype(np.int64)),
        Split(x_test, arrays["y_test"].astype(np.int64)),
    )


# --- other sources ---------------------------------------------------------------------------


def _holdout(split: Split, fraction: float, seed: int, what: str) -> tuple[Split, Split]:
    """Split off `fraction` of the examples with a seeded permutation: (rest, held out)."""
    n = len(split.x)
    n_out = int(round(n * fraction))
    if n_out < 1 or n_out >= n:
        raise DataError(
            f"{what}: cannot hold out {fraction:.0%} of {n} examples: one side would be empty"
        )
    perm = np.random.default_rng(seed).permutation(n)
    keep, out = np.sort(perm[n_out:]), np.sort(perm[:n_out])

    def take(idx):
        return Split(split.x[idx], None if split.y is None else split.y[idx])

    return take(keep), take(out)


def load_digits_dataset(cfg: DataConfig) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    # No official test split: a fixed 20% (seed 0, independent of data.seed) plays that role.
    return _holdout(Split(x, bunch.target.astype(np.int64)), 0.2, 0, "digits test split")


def load_npz_dataset(cfg: DataConfig) -> tuple[Split, Split]:
    path = Path(cfg.npz_path)
    arrays = read_npz(path, "npz file (data.npz_path)")
    if "x" not in arrays:
        raise DataError(f"{path} has keys {sorted(arrays)}; it needs 'x' (and optionally 'y')")
    x = validate_images(arrays["x"], f"{path}['x']")
    train = Split(x, check_labels(arrays.get("y"), len(x), f"{path}['y']"))
    if "x_test" in arrays:
        xt = validate_images(arrays["x_test"], f"{path}['x_test']")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test images {xt.shape[1:]} differ from x {x.shape[1:]}")
        return train, Split(xt, check_labels(arrays.get("y_test"), len(xt), f"{path}['y_test']"))
    return _holdout(train, 0.2, 0, f"{path} (no 'x_test': 20% of 'x' becomes the test set)")


def source_location(cfg: DataConfig) -> str:
    """Where the configured data comes from, for the record (MLflow's dataset source): the
    folder the IDX files are read from (or the URL they would be downloaded from), the npz
    file, or scikit-learn's bundled digits file."""
    if cfg.dataset in ("fashion-mnist", "mnist"):
        found = [d for d in _candidate_dirs(cfg.dataset, Path(cfg.root)) if _has_all(d)]
        return str(found[0].resolve()) if found else (cfg.mirror or MIRRORS[cfg.dataset])
    if cfg.dataset == "digits":
        # found without importing scikit-learn (most of a second the training stage needs not)
        import importlib.util

        (package,) = importlib.util.find_spec("sklearn").submodule_search_locations
        return str(Path(package) / "datasets" / "data" / "digits.csv.gz")
    return str(Path(cfg.npz_path).resolve())


def load_source(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, test) from the configured source; test is the official split where there is one."""
    if cfg.dataset in ("fashion-mnist", "mnist"):
        return load_idx_dataset(cfg)
    if cfg.dataset == "digits":
        return load_digits_dataset(cfg)
    return load_npz_dataset(cfg)


def prepare_splits(cfg: DataConfig) -> dict[str, Split]:
    train, test = load_source(cfg)
    train, val = _holdout(
        train, cfg.val_fraction, cfg.seed, f"param 'data.val_fraction' = {cfg.val_fraction}"
    )
    return {"train": train, "val": val, "test": test}
