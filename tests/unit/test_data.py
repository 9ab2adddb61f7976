import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import data_cfg

from vaepipe.data import arrays, sources
from vaepipe.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_set(d: Path, n_train=50, n_test=20, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for key, fname in sources.IDX_FILES.items():
        (d / fname).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


@pytest.fixture
def no_system_datasets(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "SYSTEM_DATASET_DIR", tmp_path / "no-system-datasets")


def test_mnist_from_data_root_keeps_official_test_split(tmp_path, no_system_datasets):
    arrays = write_idx_set(tmp_path / "mnist")
    cfg = data_cfg(dataset="mnist", root=str(tmp_path), download=False, val_fraction=0.2)
    splits = sources.prepare_splits(cfg)
    assert splits["train"].x.shape == (40, 1, 28, 28) and splits["val"].x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(splits["test"].x[:, 0], arrays["x_test"])
    np.testing.assert_array_equal(splits["test"].y, arrays["y_test"])
    # train + val is a permutation of the official training set, fixed by data.seed
    both = np.concatenate([splits["train"].x, splits["val"].x])[:, 0]
    assert sorted(map(bytes, both)) == sorted(map(bytes, arrays["x_train"]))
    again = sources.prepare_splits(cfg)
    np.testing.assert_array_equal(again["val"].x, splits["val"].x)


def test_missing_dataset_names_all_three_ways(tmp_path, no_system_datasets):
    cfg = data_cfg(dataset="mnist", root=str(tmp_path), download=False)
    with pytest.raises(DataError) as e:
        sources.load_source(cfg)
    msg = str(e.value)
    assert str(tmp_path) in msg and "dataset-mnist" in msg and "data.download" in msg


def test_offline_download_failure_is_clear(tmp_path, no_system_datasets):
    cfg = data_cfg(dataset="mnist", root=str(tmp_path), mirror="http://127.0.0.1:9/")
    with pytest.raises(DataError, match="download failed"):
        sources.load_source(cfg)
    assert not list((tmp_path / "mnist").glob("*.gz"))  # nothing half-written


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "bad magic"),
        (idx_bytes(np.zeros((3, 2, 2)))[:-1], "truncated or corrupt"),
        (bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big") + b"\0" * 16, "bad magic"),
        (bytes([0, 0, 0x08, 3]) + b"\0\0", "header is truncated"),
    ],
)
def test_bad_idx_content(tmp_path, content, message):
    p = tmp_path / "x.idx.gz"
    p.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=message):
        sources.read_idx(p)


def test_truncated_gzip_is_named(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 4, 4))))[:20])
    with pytest.raises(DataError, match=f"{p}.*not a valid gzip"):
        sources.read_idx(p)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_verifies_sha256_and_keeps_good_files(
    tmp_path, http_dir, monkeypatch, no_system_datasets
):
    served, url = http_dir
    arrays = write_idx_set(served)
    digests = {
        f: (hashlib.sha256((served / f).read_bytes()).hexdigest(), None)
        for f in sources.IDX_FILES.values()
    }
    monkeypatch.setitem(sources.SHA256, "mnist", digests)
    root = tmp_path / "raw"
    cfg = data_cfg(dataset="mnist", root=str(root), mirror=url)
    train, test = sources.load_source(cfg)
    np.testing.assert_array_equal(train.x[:, 0], arrays["x_train"])
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(sources.IDX_FILES.values())


def test_download_checksum_mismatch_keeps_nothing(tmp_path, http_dir, no_system_datasets):
    served, url = http_dir
    write_idx_set(served)  # not the published MNIST files: their SHA-256 cannot match
    root = tmp_path / "raw"
    with pytest.raises(DataError, match="checksum mismatch"):
        sources.download_idx("mnist", root / "mnist", url)
    assert not list((root / "mnist").iterdir())


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_fashion_mnist_download_from_local_mirror(tmp_path, http_dir, no_system_datasets):
    served, url = http_dir
    for f in sources.IDX_FILES.values():
        (served / f).write_bytes((FASHION / f).read_bytes())
    cfg = data_cfg(dataset="fashion-mnist", root=str(tmp_path / "raw"), mirror=url)
    train, test = sources.load_source(cfg)  # passes the published-content SHA-256 check
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y.max() == 9 and test.x.dtype == np.uint8


def test_digits_source_is_offline_and_scaled():
    train, test = sources.load_source(data_cfg(dataset="digits"))
    assert train.x.shape[1:] == (1, 8, 8) and len(train.x) + len(test.x) == 1797
    assert train.x.dtype == np.float32 and 0 <= train.x.min() and train.x.max() == 1.0


def test_digits_source_location_is_the_bundled_file_found_without_importing_sklearn():
    """The training stage records where digits come from; finding the file must not cost it
    the import of scikit-learn (most of a second in every tiny run)."""
    import subprocess
    import sys

    code = (
        "import dataclasses, sys\nfrom vaepipe import config\nfrom vaepipe.data import sources\n"
        "cfg = dataclasses.replace(config.load('params.yaml').data, dataset='digits')\n"
        "print(sources.source_location(cfg))\nprint('sklearn' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert Path(out[0]).name == "digits.csv.gz" and Path(out[0]).is_file()
    assert out[1] == "False"


def test_npz_source_and_round_trip(tmp_path):
    x = np.random.default_rng(0).random((30, 6, 5), dtype=np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    splits = sources.prepare_splits(data_cfg(dataset="npz", npz_path=str(tmp_path / "mine.npz")))
    assert splits["train"].x.shape[1:] == (1, 6, 5)
    arrays.save_split(tmp_path / "p" / "train.npz", splits["train"])
    back = arrays.load_split(tmp_path / "p" / "train.npz")
    np.testing.assert_array_equal(back.x, splits["train"].x)
    np.testing.assert_array_equal(back.y, splits["train"].y)
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["train.npz"]  # no temp file left


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((3, 4, 4))}, "it needs 'x'"),
        ({"x": np.zeros((3, 4))}, "expected \\[N, H, W\\]"),
        ({"x": np.zeros((0, 4, 4))}, "empty"),
        ({"x": np.full((3, 4, 4), np.nan)}, "NaN or Inf"),
        ({"x": np.full((3, 4, 4), 2.0)}, "must lie in \\[0, 1\\]"),
        ({"x": np.full((3, 4, 4), 300)}, "0..255"),
        ({"x": np.zeros((3, 4, 4), dtype=bool)}, "dtype bool"),
        ({"x": np.zeros((3, 4, 4)), "y": np.zeros(2, dtype=int)}, "labels 'y'"),
        # labels size the classifier's last layer: a class number is bounded
        ({"x": np.zeros((3, 4, 4)), "y": np.array([0, -1, 2])}, "class numbers 0 .. 9999"),
        ({"x": np.zeros((3, 4, 4)), "y": np.array([0, 10**12, 2])}, "got 0 .. 1000000000000"),
        (
            {"x": np.zeros((3, 4, 4)), "y_test": np.array([-5]), "x_test": np.zeros((1, 4, 4))},
            "y_test",
        ),
    ],
)
def test_bad_npz_names_file_and_problem(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=message) as e:
        sources.load_source(data_cfg(dataset="npz", npz_path=str(p)))
    assert str(p) in str(e.value)


def test_npz_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.load_source(data_cfg(dataset="npz", npz_path=str(tmp_path / "nope.npz")))
    p = tmp_path / "corrupt.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        sources.load_source(data_cfg(dataset="npz", npz_path=str(p)))
