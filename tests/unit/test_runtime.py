"""onnxruntime sessions: provider policy and reporting, input checks, IO binding, variants."""

import numpy as np
import onnx
import pytest
import torch
from helpers import vae_cfg
from onnx import numpy_helper

from vaepipe.errors import ModelFileError, RuntimeProviderError
from vaepipe.export import graphs, variants
from vaepipe.inference import runtime
from vaepipe.model.vae import VAE

CUDA_OK, CUDA_REASON = runtime.cuda_status()
needs_gpu = pytest.mark.skipif(not CUDA_OK, reason=f"no usable CUDA provider: {CUDA_REASON}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny VAE and its ONNX graphs, exported once for the module (export takes seconds)."""
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])).eval()
    out = tmp_path_factory.mktemp("onnx")
    return vae, graphs.export_models(vae, out, opset=18, metadata={"dataset": "digits"})


@pytest.fixture
def paths(exported):
    return exported[1]


def test_auto_reports_the_provider_that_really_runs(paths):
    sess = runtime.open_session(paths["decoder"], "auto")
    assert sess.provider == sess.session.get_providers()[0]
    assert sess.provider == (runtime.CUDA if CUDA_OK else runtime.CPU)
    assert sess.reason


def test_cpu_policy_runs_on_cpu(paths):
    sess = runtime.open_session(paths["decoder"], "cpu")
    assert sess.provider == runtime.CPU and sess.device == "cpu"


@pytest.mark.skipif(CUDA_OK, reason="this machine has a usable CUDA provider")
def test_cuda_policy_without_a_gpu_is_an_error_that_says_why(paths):
    with pytest.raises(RuntimeProviderError, match="provider 'cuda' requested but .*"):
        runtime.open_session(paths["decoder"], "cuda")


@needs_gpu
def test_cuda_policy_runs_on_cuda(paths):
    sess = runtime.open_session(paths["decoder"], "cuda")
    assert sess.provider == runtime.CUDA == sess.session.get_providers()[0]
    # float32 math, not TF32: the CUDA provider's default put the scorer 0.05 nats off on an H100
    assert sess.session.get_provider_options()[runtime.CUDA]["use_tf32"] == "0"


def test_tensorrt_without_its_library_says_so(paths):
    usable, reason = runtime.tensorrt_status()
    if usable:
        pytest.skip(f"TensorRT is installed here ({reason})")
    with pytest.raises(RuntimeProviderError, match="provider 'tensorrt' requested but") as e:
        runtime.open_session(paths["decoder"], "tensorrt")
    assert (reason if CUDA_OK else CUDA_REASON) in str(e.value)


def test_bad_policy_missing_and_broken_files(paths, tmp_path):
    allowed = "auto, cuda, tensorrt, cpu"
    with pytest.raises(RuntimeProviderError, match=f"'gpu' is not one of {allowed}"):
        runtime.open_session(paths["decoder"], "gpu")
    with pytest.raises(ModelFileError, match="does not exist"):
        runtime.open_session(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="bad.onnx is not a loadable ONNX model"):
        runtime.open_session(bad)


def test_threads_env_var_is_checked(paths, monkeypatch):
    monkeypatch.setenv("VAEPIPE_ORT_THREADS", "two")
    with pytest.raises(RuntimeProviderError, match="VAEPIPE_ORT_THREADS"):
        runtime.open_session(paths["decoder"], "cpu")
    monkeypatch.setenv("VAEPIPE_ORT_THREADS", "1")
    assert runtime.open_session(paths["decoder"], "cpu").provider == runtime.CPU


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((2, 5), np.float32), r"shape \[2, 5\]; decoder.onnx expects \[batch, 3\]"),
        (np.zeros(3, np.float32), r"shape \[3\]; .* expects \[batch, 3\]"),
        (np.zeros((0, 3), np.float32), r"empty \(0 rows\)"),
        ([["a", "b", "c"]], "holds strings"),
        (np.zeros((1, 3), complex), "holds dtype complex128"),
        ([[0.0, 1.0, np.nan], [0.0, 0.0, 0.0]], r"NaN or infinite values \(first in row 0\)"),
        ([[0.0, 0.0, 0.0], [np.inf, 0.0, 0.0]], r"NaN or infinite values \(first in row 1\)"),
        ([[0.0, 1.0, 2.0], [1.0]], "not a rectangular array"),
        (np.zeros((9, 3)), "9 rows, more than the limit of 8"),
    ],
)
def test_bad_inputs_are_named_clearly(paths, value, message):
    sess = runtime.open_session(paths["decoder"], "cpu")
    with pytest.raises(runtime.InferenceInputError, match=message):
        sess.check(value, max_batch=8)


def test_good_inputs_become_float32(paths):
    sess = runtime.open_session(paths["decoder"], "cpu")
    z = sess.check([[0, 1, 2]])
    assert z.dtype == np.float32 and z.shape == (1, 3)
    enc = runtime.open_session(paths["encoder"], "cpu")
    with pytest.raises(runtime.InferenceInputError, match=r"values in \[2, 2\]; .* \[0, 1\]"):
        enc.check(np.full((1, 1, 8, 8), 2.0), value_range=(0, 1))


@pytest.mark.parametrize("batch_size", [1, 7, 64, 4096])
def test_io_bound_batches_match_a_plain_run(paths, batch_size):
    dec = runtime.open_session(paths["decoder"], "cpu")
    z = np.random.default_rng(0).standard_normal((100, 3), dtype=np.float32)
    out = dec.run_batched(z, batch_size)
    assert list(out) == ["x_mean"]
    np.testing.assert_array_equal(out["x_mean"], dec.run({"z": z})[0])
    enc = runtime.open_session(paths["encoder"], "cpu")
    x = np.random.default_rng(1).random((50, 1, 8, 8), dtype=np.float32)
    out = enc.run_batched(x, batch_size)
    mu, logvar = enc.run({"x": x})
    np.testing.assert_array_equal(out["mu"], mu)
    np.testing.assert_array_equal(out["logvar"], logvar)


@needs_gpu
def test_io_bound_batches_on_cuda_match_cpu(paths):
    gpu = runtime.open_session(paths["decoder"], "cuda")
    cpu = runtime.open_session(paths["decoder"], "cpu")
    z = np.random.default_rng(0).standard_normal((10_000, 3), dtype=np.float32)
    out = gpu.run_batched(z, 4096)["x_mean"]
    np.testing.assert_allclose(out, cpu.run({"z": z})[0], atol=1e-5)


def test_variants_keep_the_contract_and_stay_close(exported, tmp_path):
    vae, paths = exported
    z = np.random.default_rng(0).standard_normal((16, 3), dtype=np.float32)
    ref = runtime.open_session(paths["decoder"], "cpu").run({"z": z})[0]
    for precision, convert, atol in (
        ("fp16", variants.to_fp16, 1e-2),
        ("int8", variants.to_int8, 5e-2),
    ):
        dst = convert(paths["decoder"], tmp_path / f"decoder.{precision}.onnx")
        sess = runtime.open_session(dst, "cpu")
        assert [i.name for i in sess.session.get_inputs()] == ["z"]
        assert sess.session.get_inputs()[0].type == "tensor(float)"
        assert sess.output_names == ["x_mean"]
        assert sess.metadata()["precision"] == precision
        assert sess.metadata()["latent_dim"] == "3"
        out = sess.run_batched(z, 4096)["x_mean"]
        assert out.dtype == np.float32 and np.abs(out - ref).max() < atol
        errs = graphs.parity(vae, decoder_sess=sess)
        assert set(errs) == {"decoder_b1", "decoder_b257"} and max(errs.values()) < atol
    # int8 weights: a quarter of the float32 bytes (a model this small gains little on disk:
    # the quantizer's scales and ops take about what the weights save)
    int8 = initializer_bytes(tmp_path / "decoder.int8.onnx", onnx.TensorProto.INT8)
    assert 0 < 4 * int8 <= initializer_bytes(paths["decoder"], onnx.TensorProto.FLOAT)


def initializer_bytes(path, data_type) -> int:
    """Bytes of the graph's constant tensors of `data_type`."""
    model = onnx.load(str(path))
    return sum(
        numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
        if t.data_type == data_type
    )


@needs_gpu
def test_fp16_decoder_on_cuda_is_close_to_torch(exported, tmp_path):
    vae, paths = exported
    dst = variants.to_fp16(paths["decoder"], tmp_path / "decoder.fp16.onnx")
    sess = runtime.open_session(dst, "cuda")
    errs = graphs.parity(vae, decoder_sess=sess)
    assert max(errs.values()) < 1e-2
