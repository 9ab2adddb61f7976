"""The ONNX contract (DESIGN.md): names, dtypes, dynamic batch, no random ops, metadata, parity."""

import numpy as np
import onnx
import pytest
import torch
from helpers import vae_cfg

from vaepipe.export import graphs
from vaepipe.inference import runtime


@pytest.fixture
def exported(tiny_vae, tmp_path):
    paths = graphs.export_models(tiny_vae, tmp_path, opset=18, metadata={"dataset": "digits"})
    return tiny_vae, paths


def test_graphs_follow_the_contract(exported):
    vae, paths = exported
    enc, dec = (onnx.load(str(paths[k])) for k in ("encoder", "decoder"))
    assert [i.name for i in enc.graph.input] == ["x"]
    assert [o.name for o in enc.graph.output] == ["mu", "logvar"]
    assert [i.name for i in dec.graph.input] == ["z"] and [o.name for o in dec.graph.output] == [
        "x_mean"
    ]
    for model in (enc, dec):
        assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 18
        assert not {n.op_type for n in model.graph.node} & graphs.RANDOM_OPS
        for v in list(model.graph.input) + list(model.graph.output):
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert v.type.tensor_type.shape.dim[0].dim_param == "batch"
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["latent_dim"] == "3" and meta["image_shape"] == "1,8,8"
        assert meta["likelihood"] == "bernoulli" and meta["dataset"] == "digits"
        assert meta["opset"] == "18"


def test_every_dim_but_the_batch_is_fixed(exported):
    _, paths = exported
    shapes = {
        "encoder": {"x": [1, 8, 8], "mu": [3], "logvar": [3]},
        "decoder": {"z": [3], "x_mean": [1, 8, 8]},
        "prior": {"eps": [3], "u": [], "z": [3]},
    }
    for name, expected in shapes.items():
        graph = onnx.load(str(paths[name])).graph
        got = {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
            for v in [*graph.input, *graph.output]
        }
        assert got == expected, name


def test_a_graph_the_trace_would_freeze_is_refused(tiny_vae, tmp_path):
    """A Python branch on a tensor's value is recorded as the one path the example took: such
    a graph is refused with the place that branched, and its file is never written."""

    class Branching(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z, y=None):
            return self.net(z, y) if z.sum() > 0 else self.net(-z, y)

    tiny_vae.decoder = Branching(tiny_vae.decoder)
    with pytest.raises(graphs.ExportError) as e:
        graphs.export_models(tiny_vae, tmp_path, opset=18, metadata={})
    message = str(e.value)
    assert message.startswith("decoder.onnx cannot be traced whole (test_export_graphs.py:")
    assert "Python boolean" in message and "\n" not in message
    assert not (tmp_path / "decoder.onnx").exists()


def test_parity_and_dynamic_batch_in_onnxruntime(exported):
    vae, paths = exported
    enc = runtime.open_session(paths["encoder"], "cpu")
    dec = runtime.open_session(paths["decoder"], "cpu")
    errs = graphs.parity(vae, enc, dec)
    assert set(errs) == {"encoder_b1", "encoder_b257", "decoder_b1", "decoder_b257"}
    assert max(errs.values()) < 1e-5
    for b in (1, 5, 1000):
        (x_mean,) = dec.run({"z": np.zeros((b, 3), np.float32)})
        assert x_mean.shape == (b, 1, 8, 8) and (0 <= x_mean).all() and (x_mean <= 1).all()


def test_decoder_is_deterministic(exported):
    _, paths = exported
    dec = runtime.open_session(paths["decoder"], "cpu")
    z = np.random.default_rng(0).standard_normal((4, 3), dtype=np.float32)
    np.testing.assert_array_equal(dec.run({"z": z})[0], dec.run({"z": z})[0])


def test_parity_check_notices_a_different_model(exported):
    vae, paths = exported
    enc = runtime.open_session(paths["encoder"], "cpu")
    dec = runtime.open_session(paths["decoder"], "cpu")
    with torch.no_grad():
        vae.decoder.net[0].bias += 0.5
    assert graphs.parity(vae, enc, dec)["decoder_b257"] > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"arch": "conv", "channels": [4, 8]},
        {"likelihood": "continuous_bernoulli"},
        {"likelihood": "gaussian", "learn_sigma": True, "gaussian_sigma": 0.2},
        {"arch": "conv", "channels": [4], "likelihood": "continuous_bernoulli"},
    ],
    ids=["conv", "continuous-bernoulli", "gaussian-learned-std", "conv-continuous-bernoulli"],
)
def test_every_arch_and_likelihood_exports_with_parity(options, tmp_path):
    from vaepipe.model.likelihoods import cb_mean
    from vaepipe.model.vae import VAE

    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16], **options)).eval()
    with torch.no_grad():  # push some logits far from 0, where the likelihoods' means differ
        vae.decoder.net[-1].bias.add_(torch.linspace(-6, 6, vae.decoder.net[-1].bias.numel()))
    paths = graphs.export_models(vae, tmp_path, opset=18, metadata={})
    enc = runtime.open_session(paths["encoder"], "cpu")
    dec = runtime.open_session(paths["decoder"], "cpu")
    assert max(graphs.parity(vae, enc, dec).values()) < 1e-5
    z = torch.randn(64, 3)
    (x_mean,) = dec.run({"z": z.numpy()})
    with torch.no_grad():
        logits = vae.decode(z)
    if options.get("likelihood") == "continuous_bernoulli":
        # x_mean is the continuous Bernoulli's mean, not the sigmoid of its parameter
        np.testing.assert_allclose(x_mean, cb_mean(logits).numpy(), atol=1e-5)
        assert np.abs(x_mean - torch.sigmoid(logits).numpy()).max() > 0.05
    else:
        np.testing.assert_allclose(x_mean, torch.sigmoid(logits).numpy(), atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(paths["decoder"])).metadata_props}
    assert meta["likelihood"] == options.get("likelihood", "bernoulli")
