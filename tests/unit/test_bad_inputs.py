"""Property tests: whatever params, npz arrays or IDX bytes a user hands us, the answer is a valid
result or our own error (ConfigError / DataError), never another exception (a traceback)."""

import dataclasses
import gzip
import math
import pickle
import string
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from helpers import data_cfg, params_dict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vaepipe import config
from vaepipe.data import arrays, sources
from vaepipe.errors import ConfigError, DataError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- params ------------------------------------------------------------------------------------

SECTIONS = config.SECTIONS
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
CHOICES = sorted(
    {
        c
        for cls in SECTIONS.values()
        for f in dataclasses.fields(cls)
        for c in f.metadata.get("choices", ())
    }
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: includes values far beyond any float or C long
    st.integers(min_value=-3, max_value=3),
    st.floats(),  # NaN, +-Inf, subnormals, huge
    st.sampled_from([0.0, 0.5, 1.0, 1e-3, -1.0, 1e400, 2**63, 2**64, 2**32, 10**30, 10**400]),
    st.text(max_size=12),
    st.sampled_from(CHOICES),
    st.dates(),  # what YAML makes of `2024-01-01`
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=10,
)
any_key = st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans())


@st.composite
def params_dicts(draw):
    """Mostly real sections and keys (so values reach type and range checks), some strays."""
    raw = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.one_of(st.sampled_from(sorted(SECTIONS)), any_key))
        if draw(st.integers(0, 9)) == 0:
            raw[section] = draw(values)
            continue
        body = {}
        for _ in range(draw(st.integers(0, 4))):
            known = FIELDS.get(section) if isinstance(section, str) else None
            key = draw(st.sampled_from(known)) if known and draw(st.booleans()) else draw(any_key)
            body[key] = draw(values)
        raw[section] = body
    return raw


def _named(key) -> str:
    """How an error message shows a YAML key (config._show for ints, None...)."""
    return key if isinstance(key, str) else config._show(key)


def _keys_given(raw) -> set[str]:
    """What an error about `raw` laid over params.yaml may name: the sections and keys in raw
    (the defaults are valid, so whatever is wrong came from raw)."""
    if not isinstance(raw, dict):
        return {"the params file"}
    names = set()
    for section, body in raw.items():
        names.add(f"'{_named(section)}")  # the section, or any of its keys
        if isinstance(body, dict):
            names |= {f"'{_named(section)}.{_named(k)}" for k in body}
    return names


def check_params(raw) -> None:
    try:
        params = config.from_dict(params_dict(raw))
    except ConfigError as e:
        named = _keys_given(raw)
        assert any(n in str(e) for n in named), f"{e} names none of {sorted(named)}"
        return
    assert isinstance(params, config.Params)
    flat = config.flatten(params)
    # Whatever validation lets through is usable: right types, finite numbers, in range.
    for key, value in flat.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert flat["model.latent_dim"] >= 1 and flat["train.lr"] > 0
    assert 0 < flat["data.val_fraction"] < 1
    for seed in ("data.seed", "train.seed", "evaluate.seed"):  # train also seeds with seed + 1
        torch.Generator().manual_seed(flat[seed] + 1)
        np.random.default_rng(flat[seed])
    # ...and survives the round trip through params.yaml that DVC does.
    assert config.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict(params)))) == params


@SETTINGS
@given(params_dicts())
@example({"train": {"lr": 10**400}})  # beyond any float: float() raises OverflowError
@example({"model": {10**5000: 1}})  # a key too long for str(): ValueError
@example({"train": {"seed": 2**64}})  # beyond torch.manual_seed
@example({"data": {"root": "x" * 10**4}})
def test_random_params_dicts_are_valid_or_a_config_error(raw):
    check_params(raw)


@SETTINGS
@given(values)
def test_random_top_level_values_are_valid_or_a_config_error(raw):
    check_params(raw)


@SETTINGS
@given(st.text(alphabet=string.printable, max_size=200))
def test_random_params_files_are_valid_or_a_config_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(text)
        try:
            params = config.load(path)
        except ConfigError as e:
            assert str(e), "a ConfigError must say what is wrong"
            return
    assert isinstance(params, config.Params)


# --- npz files ---------------------------------------------------------------------------------

DTYPES = st.sampled_from(
    [
        np.uint8,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint16,
        np.uint64,
        np.bool_,
        np.float16,
        np.float32,
        np.float64,
        np.longdouble,
        np.complex64,
        np.complex128,
        np.dtype("<U3"),
        np.dtype("S2"),
        np.dtype("datetime64[s]"),
        np.dtype("timedelta64[s]"),
        np.dtype([("a", np.uint8), ("b", np.float32)]),
    ]
)


@st.composite
def any_array(draw, leading: int | None = None):
    """Any dtype and 0-5 dims; sometimes plausible images (so the valid path is taken too)."""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from([np.uint8, np.int64, np.float16, np.float32, np.float64]))
        n = leading if leading is not None else draw(st.integers(0, 12))
        shape = (n, *draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=4)))
        if np.issubdtype(dtype, np.floating):
            elements = st.one_of(
                st.floats(0, 1, width=16),
                st.sampled_from([0.0, 1.0, np.nan, np.inf, -np.inf, -0.5, 1.5, 255.0]),
            )
        else:
            info = np.iinfo(dtype)
            odd = [v for v in (-1, 256, 10**6, info.max) if info.min <= v <= info.max]
            elements = st.one_of(st.integers(0, 255), st.sampled_from(odd))
        return draw(hnp.arrays(dtype, shape, elements=elements))
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def npz_contents(draw):
    names = st.one_of(
        st.sampled_from(["x", "y", "x_test", "y_test"]),
        # any array name np.savez can write ('file' is the name of its own first argument)
        st.text(
            alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=6
        ).filter(lambda name: name != "file"),
    )
    arrays = {}
    for name in draw(st.lists(names, max_size=4, unique=True)):
        arrays[name] = draw(any_array())
    if "x" in arrays and draw(st.booleans()):  # labels that fit x, to reach the valid path
        n = len(arrays["x"]) if arrays["x"].ndim else 0
        arrays["y"] = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 9)))
    return arrays


def assert_valid_split(split: arrays.Split) -> None:
    x = split.x
    assert x.ndim == 4 and len(x) >= 1 and min(x.shape) >= 1
    assert x.dtype in (np.uint8, np.float32)
    if x.dtype == np.float32:
        assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    if split.y is not None:
        assert split.y.dtype == np.int64 and split.y.shape == (len(x),)
    unit = arrays.to_unit(x)
    assert unit.dtype == np.float32 and unit.min() >= 0 and unit.max() <= 1


@SETTINGS
@given(npz_contents())
@example({"x": np.zeros((1, 8, 8), np.uint8)})  # too few images to split: name the file
@example({"x": np.zeros((5, 8, 8), "timedelta64[s]")})  # an integer subtype, not pixels
def test_random_npz_files_load_as_valid_splits_or_a_data_error(arrays):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "user.npz"
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        try:
            train, test = sources.load_source(data_cfg(dataset="npz", npz_path=str(path)))
        except DataError as e:
            assert str(path) in str(e), "the error must name the file"
            return
    assert_valid_split(train)
    assert_valid_split(test)
    assert train.x.shape[1:] == test.x.shape[1:]


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(["user.npz", "user"]))
def test_random_bytes_as_npz_are_a_data_error(blob, name):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(blob)
        try:
            train, _ = sources.load_source(data_cfg(dataset="npz", npz_path=str(path)))
        except DataError:
            return
    assert_valid_split(train)  # pragma: no cover - random bytes are never a valid npz


@st.composite
def odd_npz_file(draw, path: Path) -> str:
    """Files a user might point data.npz_path at that are not an .npz of arrays."""
    kind = draw(st.sampled_from(["npy", "zip", "pickle", "dir", "empty", "object"]))
    arr = draw(any_array())
    if kind == "npy":  # np.save to an open file keeps the name
        with open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    elif kind == "zip":  # a zip of raw members, e.g. made by hand
        with zipfile.ZipFile(path, "w") as z:
            names = st.lists(
                st.sampled_from(["x", "x.npy", "y", "x.txt"]), min_size=1, unique=True
            )
            for name in draw(names):
                z.writestr(name, draw(st.binary(max_size=64)))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"x": arr}))
    elif kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # object arrays need allow_pickle, which we never set
        with open(path, "wb") as f:
            np.savez(f, x=np.array([arr, None], dtype=object))
    return kind


@SETTINGS
@given(st.data())
def test_files_that_are_not_npz_archives_are_a_data_error(draw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "user.npz"
        draw.draw(odd_npz_file(path))
        try:
            train, _ = sources.load_source(data_cfg(dataset="npz", npz_path=str(path)))
        except DataError as e:
            assert str(path) in str(e)
            return
    assert_valid_split(train)


# --- IDX bytes ---------------------------------------------------------------------------------

DIMS = st.one_of(st.integers(0, 5), st.sampled_from([1, 65536, 2**31, 2**32 - 1]))


@st.composite
def idx_blobs(draw):
    """A plausible header (right magic, any ndim, chosen dims) and a body of any length."""
    dtype = draw(st.one_of(st.just(0x08), st.integers(0, 255)))
    ndim = draw(st.one_of(st.integers(0, 4), st.integers(0, 255)))
    dims = draw(st.lists(DIMS, min_size=ndim, max_size=ndim))
    header = bytes([0, 0, dtype, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    expected = math.prod(dims)
    size = draw(
        st.one_of(
            st.just(expected if expected <= 4096 else 0),
            st.integers(0, 64),
        )
    )
    cut = draw(st.one_of(st.none(), st.integers(0, len(header))))
    blob = header + draw(st.binary(min_size=size, max_size=size))
    return blob if cut is None else blob[:cut]


def check_idx(blob: bytes, source: str = "test.idx") -> None:
    try:
        arr = sources.parse_idx(blob, source)
    except DataError as e:
        assert source in str(e)
        return
    assert arr.dtype == np.uint8
    assert arr.ndim == blob[3] and list(arr.shape) == [
        int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(blob[3])
    ]
    assert arr.tobytes() == blob[4 + 4 * arr.ndim :]


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_parse_as_idx_or_a_data_error(blob):
    check_idx(blob)


@SETTINGS
@given(idx_blobs())
@example(bytes([0, 0, 8, 65]) + (1).to_bytes(4, "big") * 65 + b"\x00")  # more dims than numpy
@example(bytes([0, 0, 8, 4]) + (65536).to_bytes(4, "big") * 4)  # 2**64 elements: int64 wraps
@example(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (0, 2**31, 2**31)))
def test_random_idx_headers_parse_or_a_data_error(blob):
    check_idx(blob)


@SETTINGS
@given(st.one_of(idx_blobs(), st.binary(max_size=100)), st.booleans(), st.booleans())
def test_random_idx_files_read_or_a_data_error(blob, gz, cut):
    if gz:
        blob = gzip.compress(blob)
    if cut:
        blob = blob[: len(blob) // 2]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
        path.write_bytes(blob)
        try:
            arr = sources.read_idx(path)
        except DataError as e:
            assert str(path) in str(e)
            return
    assert arr.dtype == np.uint8
