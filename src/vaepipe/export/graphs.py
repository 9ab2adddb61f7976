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

import io
import warnings
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
# Most [images, scorer_k, exemplars] entries one run of an Exemplar-prior model's scorer.onnx
# may hold (its density is one block in the graph, float64: 512 MB): scorer_max_images
SCORER_BLOCK = 2**26


def scorer_max_images(cfg, scorer_k: int) -> int | None:
    """The most images one scorer.onnx run of a model of VAEConfig `cfg` may take (recorded as
    its `max_batch`), or None for no bound: only the Exemplar prior's density grows with the
    training set, scorer_k x N terms an image."""
    if cfg.prior != "exemplar":
        return None
    return max(1, SCORER_BLOCK // (scorer_k * cfg.n_exemplars))


class ExportError(VaepipeError):
    pass


class TraceGuessed(Exception):
    """The tracer read a tensor as a Python value: its graph would hold that value fixed."""


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


def _traced(module: nn.Module, examples: tuple, in_names, out_names, opset: int):
    """The graph as torch.onnx's TorchScript tracer records it (a ModelProto).

    Every graph of the contract is a feed-forward net with no data-dependent control flow,
    which a trace captures whole: 0.1 s for the four graphs of a small model, against about
    5 s for torch.export's capture and decompositions plus 2 s of importing them. A trace that
    had to guess (a TracerWarning: a tensor read as a Python number or bool) is refused rather
    than kept with the guess frozen in."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")  # the tracer's deprecation notice
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.jit.TracerWarning.ignore_lib_warnings()  # torch's own, about its internals
        torch.onnx.export(
            module,
            examples,
            buffer,
            input_names=list(in_names),
            output_names=list(out_names),
            opset_version=opset,
            dynamo=False,
            dynamic_axes={name: {0: "batch"} for name in (*in_names, *out_names)},
        )
    guesses = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if guesses:
        w = guesses[0]
        raise TraceGuessed(f"{Path(w.filename).name}:{w.lineno}: {str(w.message).split('. ')[0]}")
    return onnx.load_model_from_string(buffer.getvalue())


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
    try:
        model = _traced(module, examples, in_names, tuple(out_names), opset)
    except TraceGuessed as e:
        raise ExportError(f"{path.name} cannot be traced whole ({e})") from None
    random = sorted({n.op_type for n in model.graph.node} & RANDOM_OPS)
    if random:
        raise ExportError(f"exported graph of {path.name} contains random ops {random}")
    # batch first, the rest fixed: as the example inputs and the outputs they gave
    with torch.no_grad():
        outputs = module(*examples)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    shapes = [t.shape for t in (*examples, *outputs)]
    for value, shape in zip([*model.graph.input, *model.graph.output], shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        for size in shape[1:]:
            dims.add().dim_value = size
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
        most = scorer_max_images(cfg, len(scorer_eps))
        extra["scorer"].update({} if most is None else {"max_batch": most})
    graphs["prior"] = (
        PriorSampler(vae),
        (torch.randn(2, cfg.latent_dim), torch.rand(2)),
        (("eps", "u"), ("z",)),
    )
    extra["prior"] = {"prior": cfg.prior, "prior_components": cfg.prior_components}
    if cfg.prior == "exemplar":
        extra["prior"]["exemplars"] = cfg.n_exemplars
    paths = {}
    for name, (module, example, names) in graphs.items():
        paths[name] = out_dir / f"{name}.onnx"
        _export(module, example, paths[name], names, opset=opset, metadata={**meta, **extra[name]})
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
            n = min(b, scorer_max_images(vae.cfg, len(scorer_eps)) or b)
            xs, ys = x[:n], None if y is None else y[:n]
            feed_ys = {} if ys is None else {"y": ys.numpy()}
            (o_nll,) = scorer_sess.run({"x": xs.numpy(), **feed_ys})
            nll = -iwae_estimate(vae, xs, scorer_eps, ys).numpy()
            errs[f"scorer_b{n}"] = float(np.abs(o_nll - nll).max())
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
