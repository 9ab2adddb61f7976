"""ONNX export of encoder, decoder, scorer and prior sampler per the contract (docs/onnx.md),
and their parity with PyTorch.

encoder.onnx: x float32 [batch, C, H, W] in [0, 1] -> mu, logvar float32 [batch, latent_dim]
decoder.onnx: z float32 [batch, latent_dim] -> x_mean float32 [batch, C, H, W]
scorer.onnx:  x float32 [batch, C, H, W] in [0, 1] -> nll float32 [batch], nats: the IWAE
              estimate of -log p(x) with k samples whose noise is a constant of the graph
prior.onnx:   eps float32 [batch, latent_dim] ~ N(0, I), u float32 [batch] ~ U[0, 1) -> z
              float32 [batch, latent_dim] ~ p(z) (eps itself for the N(0, I) prior)
Batch axis dynamic; no random op inside; opset pinned; metadata_props describe the model.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaepipe.errors import VaepipeError
from vaepipe.evaluation.likelihood import iwae_estimate
from vaepipe.fileio import atomic_path
from vaepipe.model.vae import VAE, DecoderMean, PriorSampler

RANDOM_OPS = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
PARITY_BATCHES = (1, 257)
PARITY_SEED = 0  # of the random inputs the graphs and PyTorch are compared on
# The scorer's NLL runs to hundreds of nats; float32 agrees with PyTorch to below this (a
# warning above it: a density with a tiny Gaussian sigma sums to thousands of nats)
SCORER_ATOL_NATS = 1e-3


class ExportError(VaepipeError):
    pass


class EncoderGraph(nn.Module):
    """x -> (mu, logvar): the deterministic half of q(z|x); sampling is the caller's job."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        return self.vae.encode(x, y)


class ScorerGraph(nn.Module):
    """x -> nll [B]: minus the IWAE bound with the fixed noise `eps` [K, D] (a buffer, so a
    constant of the graph: deterministic, no random op), the evaluate stage's computation."""

    def __init__(self, vae: VAE, eps: torch.Tensor):
        super().__init__()
        self.vae = vae
        self.register_buffer("eps", eps.detach().clone())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return -iwae_estimate(self.vae, x, self.eps, y)


# The registries of ONNX decompositions built so far in this process, by their arguments
_REGISTRIES: dict = {}


@contextlib.contextmanager
def _one_torchlib_registry() -> Iterator[None]:
    """torch.onnx.export builds its registry of ONNX decompositions (every torchlib function)
    afresh on every call: 2.6 s of a 4-6 s export on 2 CPU cores. Inside this block the calls
    of this process share one per opset (export only reads it). Where torch's exporter is laid
    out otherwise, it is left as it is."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = original.__func__(cls, *args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def _export(
    module: nn.Module,
    example: torch.Tensor | tuple,
    path: Path,
    names,
    *,
    opset: int,
    metadata: dict[str, str],
) -> None:
    """Export `module` (inputs named as its forward's arguments, all with a batch axis 0)."""
    import onnx

    module = module.eval()
    in_names, out_names = names
    in_names = (in_names,) if isinstance(in_names, str) else tuple(in_names)
    examples = example if isinstance(example, tuple) else (example,)
    batch = torch.export.Dim("batch", min=1)
    # The exporter warns about torchvision ops it cannot register; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            examples,
            input_names=list(in_names),
            output_names=list(out_names),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={name: {0: batch} for name in in_names},
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    random = sorted({n.op_type for n in model.graph.node} & RANDOM_OPS)
    if random:
        raise ExportError(f"exported graph of {path.name} contains random ops {random}")
    # The dynamo exporter names the batch dim 'batch'; make sure every output agrees.
    for value in list(model.graph.input) + list(model.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_param = "batch"
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def model_metadata(cfg) -> dict:
    """The metadata_props every graph carries about the model (docs/onnx.md)."""
    return {
        "latent_dim": cfg.latent_dim,
        "image_shape": ",".join(map(str, cfg.image_shape)),
        "likelihood": cfg.likelihood,
        "arch": cfg.arch,
        "prior": cfg.prior,
        "n_classes": cfg.n_classes,
    }


def export_models(
    vae: VAE,
    out_dir: Path,
    opset: int,
    metadata: dict[str, str],
    scorer_eps: torch.Tensor | None = None,
    scorer_seed: int | None = None,
) -> dict[str, Path]:
    """encoder.onnx, decoder.onnx and prior.onnx in out_dir, and scorer.onnx given its noise
    [K, D]: {name: path}."""
    vae = vae.cpu().eval()
    cfg = vae.cfg
    meta = {**model_metadata(cfg), "opset": opset, "precision": "fp32", **metadata}
    # a conditional model's graphs also take y, one-hot float32 labels [batch, n_classes]
    y = (torch.eye(cfg.n_classes)[[0, 1 % cfg.n_classes]],) if cfg.conditional else ()
    with_y = ("y",) if cfg.conditional else ()
    images = (torch.rand(2, *cfg.image_shape), *y)
    graphs = {
        "encoder": (EncoderGraph(vae), images, (("x", *with_y), ("mu", "logvar"))),
        "decoder": (
            DecoderMean(vae),
            (torch.randn(2, cfg.latent_dim), *y),
            (("z", *with_y), ("x_mean",)),
        ),
    }
    extra: dict[str, dict] = {"encoder": {}, "decoder": {}}
    if scorer_eps is not None:
        graphs["scorer"] = (ScorerGraph(vae, scorer_eps), images, (("x", *with_y), ("nll",)))
        extra["scorer"] = {"scorer_k": len(scorer_eps), "scorer_seed": scorer_seed}
    graphs["prior"] = (
        PriorSampler(vae),
        (torch.randn(2, cfg.latent_dim), torch.rand(2)),
        (("eps", "u"), ("z",)),
    )
    extra["prior"] = {"prior": cfg.prior, "prior_components": cfg.prior_components}
    paths = {}
    with _one_torchlib_registry():
        for name, (module, example, names) in graphs.items():
            paths[name] = out_dir / f"{name}.onnx"
            metadata = {**meta, **extra[name]}
            _export(module, example, paths[name], names, opset=opset, metadata=metadata)
    return paths


@torch.no_grad()
def parity(
    vae: VAE,
    encoder_sess=None,
    decoder_sess=None,
    *,
    scorer_sess=None,
    scorer_eps: torch.Tensor | None = None,
    prior_sess=None,
) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch outputs at batch 1 and 257.

    Any session may be None (e.g. a decoder variant alone); the inputs drawn are the same. The
    scorer's difference is in nats (its output is an NLL of hundreds of nats).
    """
    vae = vae.cpu().eval()
    gen = torch.Generator().manual_seed(PARITY_SEED)
    errs: dict[str, float] = {}
    for b in PARITY_BATCHES:
        x = torch.rand((b, *vae.cfg.image_shape), generator=gen)
        z = torch.randn((b, vae.cfg.latent_dim), generator=gen)
        y = _labels(vae, b, gen)
        feed_y = {} if y is None else {"y": y.numpy()}
        if encoder_sess is not None:
            mu, logvar = vae.encode(x, y)
            o_mu, o_logvar = encoder_sess.run({"x": x.numpy(), **feed_y})
            errs[f"encoder_b{b}"] = float(
                max(np.abs(o_mu - mu.numpy()).max(), np.abs(o_logvar - logvar.numpy()).max())
            )
        if decoder_sess is not None:
            (o_x,) = decoder_sess.run({"z": z.numpy(), **feed_y})
            errs[f"decoder_b{b}"] = float(np.abs(o_x - vae.mean(vae.decode(z, y)).numpy()).max())
        if scorer_sess is not None:
            (o_nll,) = scorer_sess.run({"x": x.numpy(), **feed_y})
            nll = -iwae_estimate(vae, x, scorer_eps, y).numpy()
            errs[f"scorer_b{b}"] = float(np.abs(o_nll - nll).max())
        if prior_sess is not None:
            u = torch.rand(b, generator=gen)
            (o_z,) = prior_sess.run({"eps": z.numpy(), "u": u.numpy()})
            errs[f"prior_b{b}"] = float(np.abs(o_z - vae.sample_prior(z, u).numpy()).max())
    return errs


def parity_of(vae: VAE, sessions: dict, scorer_eps: torch.Tensor | None = None) -> dict:
    """parity() of every graph in `sessions` ({"encoder": session, "decoder": ..., "scorer":
    ..., "prior": ...}, any subset)."""
    return parity(
        vae,
        sessions.get("encoder"),
        sessions.get("decoder"),
        scorer_sess=sessions.get("scorer"),
        scorer_eps=scorer_eps,
        prior_sess=sessions.get("prior"),
    )


def _labels(vae: VAE, b: int, gen: torch.Generator) -> torch.Tensor | None:
    """Random one-hot labels [b, n_classes] for a conditional model's parity, else None."""
    if not vae.cfg.conditional:
        return None
    n = vae.cfg.n_classes
    return torch.eye(n)[torch.randint(0, n, (b,), generator=gen)]
