"""The evaluate stage's report: every figure of a trained model on the test set, assembled from
the evaluation modules (likelihood, collapse, latent quality, separation, sample quality), with
the reasons for the figures it could not measure, its pictures, its MLflow record and the
summary it prints.

`measure` computes everything and draws the pictures into a folder; the stage writes the
results to metrics/evaluate.json and logs them (`log_to_mlflow`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaepipe import config, paths, tracking
from vaepipe.data import arrays, sources
from vaepipe.errors import DataError
from vaepipe.evaluation import collapse, latent, likelihood, ood, pictures, plots, quality
from vaepipe.fileio import read_json
from vaepipe.model.vae import VAE

AGGREGATE_COMPONENTS = 10  # Gaussians of the mixture fitted to the training codes (FID of q(z))


@dataclass
class Inputs:
    x: torch.Tensor  # [N, C, H, W] what the likelihood is measured on (binarized if Bernoulli)
    grey: torch.Tensor  # [N, C, H, W] intensities in [0, 1], what a deployment encodes
    y: np.ndarray | None  # [N] labels, or None
    split: arrays.Split  # the prepared test split as stored
    labels: torch.Tensor | None = None  # [N] on the device, for a conditional model only


def load_test(vae: VAE, device: torch.device, seed: int) -> Inputs:
    test = arrays.load_split(paths.prepared("test"))
    grey = torch.from_numpy(arrays.to_unit(test.x)).to(device)
    if tuple(grey.shape[1:]) != tuple(vae.cfg.image_shape):
        raise DataError(
            f"test images {tuple(grey.shape[1:])} do not match the model's "
            f"{tuple(vae.cfg.image_shape)}; rerun the pipeline"
        )
    # The likelihood is measured on the data the model was trained to explain: one fixed
    # Bernoulli draw of the test set for a Bernoulli model (the benchmark standard).
    x = grey
    if vae.cfg.likelihood == "bernoulli":
        x = arrays.binarize(grey, torch.Generator(device=device).manual_seed(seed))
    labels = None
    if vae.cfg.conditional:
        if test.y is None:
            raise DataError("the model is conditional but the test set has no labels")
        labels = torch.from_numpy(test.y).to(device)
    return Inputs(x, grey, test.y, test, labels)


def train_latents(
    vae: VAE, device: torch.device, ev: config.EvaluateConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """mu of a seeded subsample of the training images (grey), with their labels."""
    train = arrays.load_split(paths.prepared("train"))
    idx = latent.subsample(len(train.x), ev.probe_train_size, ev.seed)
    grey = torch.from_numpy(arrays.to_unit(train.x[idx])).to(device)
    labels = None
    if vae.cfg.conditional:
        labels = torch.from_numpy(train.y[idx]).to(device)
    mu, _ = likelihood.encode_all(vae, grey, batch_size=ev.batch_size, y=labels)
    return mu.cpu().numpy(), None if train.y is None else train.y[idx]


def likelihood_figures(vae: VAE, inp: Inputs, ev: config.EvaluateConfig):
    """IWAE NLL with its standard error, bits/dim and the ELBO terms; the test KL per dim; and
    each image's NLL (what `vaepipe promote` pairs between two models)."""
    elbo, kl_d = likelihood.evaluate_elbo(
        vae, inp.x, batch_size=ev.batch_size, seed=ev.seed, y=inp.labels
    )
    # The IWAE bound on the first iwae_n test images (0 = all): k x n decoder passes, the
    # costliest figure here; the first 1,000 is the literature's usual subset.
    n = min(ev.iwae_n or len(inp.x), len(inp.x))
    labels = None if inp.labels is None else inp.labels[:n]
    log_px = likelihood.iwae_log_likelihood(vae, inp.x[:n], ev.iwae_k, seed=ev.seed, y=labels)
    nll, nll_se = likelihood.mean_and_stderr(-log_px)
    return (
        {
            "iwae_n": n,
            "test/nll_iwae": nll,
            "test/nll_iwae_stderr": nll_se,
            "test/bits_per_dim": nll / (math.prod(vae.cfg.image_shape) * math.log(2)),
            "test/elbo": elbo["elbo"],
            "test/recon": elbo["recon"],
            "test/kl": elbo["kl"],
        },
        kl_d,
        -log_px.double().cpu().numpy(),
    )


def collapse_figures(vae: VAE, mu, logvar, ev: config.EvaluateConfig) -> dict:
    """Active units, I(x; z) and KL(q(z) || p(z)) (against the model's prior) from the test
    posteriors."""
    n_active, _ = collapse.active_units(mu, ev.active_threshold)
    log_prior = None if vae.cfg.prior == "standard" else vae.prior.log_prob
    info = collapse.posterior_information(mu, logvar, seed=ev.seed, log_prior=log_prior)
    return {
        "test/active_units": n_active,
        "test/mutual_info": info["mutual_info"],
        "test/aggregate_kl": info["aggregate_kl"],
    }


def reconstruction_figures(
    vae: VAE, inp: Inputs, ev: config.EvaluateConfig
) -> tuple[dict, likelihood.Reconstruction]:
    rec = likelihood.reconstruct(vae, inp.x, inp.grey, batch_size=ev.batch_size, y=inp.labels)
    mse = rec.mse.mean().item()
    return {
        "test/recon_nll_mu": rec.recon_nll.mean().item(),
        "test/mse": mse,
        "test/psnr": likelihood.psnr(mse),
        "test/psnr_per_image": rec.psnr.mean().item(),
    }, rec


def separation(vae: VAE, inp: Inputs, params: config.Params) -> tuple[dict, dict]:
    """AUROCs of the scorer's NLL (export.scorer_k, export.scorer_seed: the noise scorer.onnx
    carries) between the first evaluate.ood_n grey test images and their corruptions or
    another dataset: (results, skipped)."""
    ev, ex = params.evaluate, params.export
    eps = likelihood.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    y = None if inp.labels is None else inp.labels[: ev.ood_n]
    sets, why = ood.separation(
        vae, inp.grey[: ev.ood_n], eps, dataset=params.data.dataset, seed=ev.seed, y=y
    )
    results = {f"test/auroc_{k}": v["auroc"] for k, v in sets.items() if "auroc" in v}
    results["separation"] = {**sets, "n": min(ev.ood_n, len(inp.grey)), "k": ex.scorer_k}
    return results, {f"test/auroc_{k.replace(' ', '_')}": v for k, v in why.items()}


def sample_quality(vae: VAE, inp: Inputs, params: config.Params, mu_train) -> tuple[dict, dict]:
    """FID, precision and recall of evaluate.fid_n samples against as many test images, in the
    classifier stage's feature space, for each way of drawing z: N(0, I), the model's learned
    prior, and a 10-component Gaussian mixture fitted to the training codes (the aggregate
    posterior, what the decoder saw). test/fid (precision, recall) are those of the model's
    own prior: what `vaepipe generate` draws."""
    classifier, why = quality.load_classifier(paths.CLASSIFIER)
    names = ("test/fid", "test/precision", "test/recall")
    if classifier is None:
        return {}, dict.fromkeys(names, why)
    ev = params.evaluate
    n = min(ev.fid_n, len(inp.grey))
    real = quality.features(classifier, inp.grey[:n].cpu())
    gen = torch.Generator().manual_seed(ev.seed)
    eps, u = torch.randn(n, vae.cfg.latent_dim, generator=gen), torch.rand(n, generator=gen)
    draws = {"standard": eps}
    if vae.cfg.prior != "standard":
        with torch.no_grad():
            draws["prior"] = vae.sample_prior(eps.to(inp.x.device), u.to(inp.x.device))
    draws["aggregate"] = torch.from_numpy(
        quality.aggregate_posterior_sampler(mu_train, AGGREGATE_COMPONENTS, ev.seed)(n)
    )
    # a conditional model draws every label equally often; the classifier then says whether
    # each sample shows the class it was asked for
    y = torch.arange(n, device=inp.x.device) % vae.cfg.n_classes if vae.cfg.conditional else None
    table = {}
    for name, z in draws.items():
        images = torch.from_numpy(latent.decode_mean(vae, z.to(inp.x.device), y))
        table[name] = quality.quality(classifier, real, images)
        if y is not None:
            table[name]["cond_accuracy_per_label"] = quality.accuracy_per_label(
                classifier, images, y.cpu()
            )
    own = table["prior" if "prior" in table else "standard"]
    accuracy = read_json(paths.CLASSIFIER_METRICS).get("test_accuracy")
    results = {f"test/{k}": v for k, v in own.items() if not isinstance(v, list)}
    results.update({f"test/fid_{name}": t["fid"] for name, t in table.items()})
    if y is not None:
        results["test/cond_accuracy"] = float(np.mean(own["cond_accuracy_per_label"]))
    results["sample_quality"] = {**table, "n": n, "classifier_accuracy": accuracy}
    return results, {}


@dataclass
class Report:
    results: dict  # metrics/evaluate.json: test/* figures and their protocol
    skipped: dict[str, str]  # figure -> why it could not be measured
    per_image: np.ndarray  # each test image's IWAE NLL (what `vaepipe promote` pairs)


PHASES = (
    "likelihood (IWAE)",
    "reconstruction",
    "latent quality",
    "pictures",
    "separation",
    "sample quality",
)


class Progress:
    """One tqdm line for evaluate, naming the phase under way (phases, not batches: the long
    ones are IWAE and sample quality). On stderr, as train's bar."""

    def __init__(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(PHASES), desc="evaluate", unit="phase", leave=True)
        self.started = False

    def __call__(self, phase: str) -> None:
        """`phase` begins (the one before it has ended)."""
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(phase)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.set_postfix_str("done")
        self.bar.close()


def measure(vae: VAE, inp: Inputs, params: config.Params, dataset: str | None, out: Path):
    """Every figure of the model on the test set, and its pictures drawn into `out`: a Report.
    dataset: what the model was trained on (names the classes in the pictures)."""
    ev = params.evaluate
    phase = Progress()
    phase(PHASES[0])
    results, kl_d, per_image = likelihood_figures(vae, inp, ev)
    # Collapse diagnostics on the data the likelihood is measured on; latent quality and the
    # pictures on grey images, as a deployment would encode them.
    mu, logvar = likelihood.encode_all(vae, inp.x, batch_size=ev.batch_size, y=inp.labels)
    with torch.no_grad():
        results.update(collapse_figures(vae, mu, logvar, ev))
    phase(PHASES[1])
    recon_results, rec = reconstruction_figures(vae, inp, ev)
    results.update(recon_results)
    phase(PHASES[2])
    mu_grey, _ = likelihood.encode_all(vae, inp.grey, batch_size=ev.batch_size, y=inp.labels)
    mu_train, y_train = train_latents(vae, inp.x.device, ev)
    scores = latent.latent_quality(
        mu_train, y_train, mu_grey.cpu().numpy(), inp.y, knn_k=ev.knn_k, seed=ev.seed
    )
    results.update({f"test/{k}": v for k, v in scores.scores.items()})
    skipped = {f"test/{k}": why for k, why in scores.skipped.items()}

    phase(PHASES[3])
    act = collapse.activity(mu)
    draw = pictures.Pictures(vae, inp.grey, y=inp.y, labels=inp.labels, out=out, ev=ev)
    draw.images(inp.x, rec.mse)
    draw.latents(mu_grey, kl_d, act, plots.CLASS_NAMES.get(dataset))
    skipped.update(draw.charts(kl_d, act))
    for name, measure_it in zip(PHASES[4:], (separation, sample_quality), strict=True):
        phase(name)
        figures, why = measure_it(vae, inp, params, *([mu_train] if name == PHASES[5] else []))
        results.update(figures)
        skipped.update(why)
    phase.close()
    results.update(
        iwae_k=ev.iwae_k,
        n_test=len(inp.x),
        n_probe_train=len(mu_train),
        mutual_info_max=math.log(len(inp.x)),
        skipped=skipped,
        data_digest=arrays.digest(inp.split),
    )
    return Report(results, skipped, per_image)


PROTOCOL_TAG = "test.nll_protocol"
# metrics/summary.json: the figures `dvc exp show` compares, the protocol of the NLL beside it
# (every figure stays in evaluate.json and train.json, and in MLflow)
HEADLINE = (
    "test/nll_iwae",
    "test/nll_iwae_stderr",
    "iwae_k",
    "iwae_n",
    "test/elbo",
    "test/recon",
    "test/kl",
    "test/active_units",
    "test/probe_accuracy",
    "test/fid",
)
HEADLINE_TRAIN = ("best_epoch", "elbo/val")


def headline(results: dict, train: dict) -> dict:
    """metrics/summary.json: HEADLINE of evaluate's results (those it has) and HEADLINE_TRAIN
    of train.json."""
    out = {k: results[k] for k in HEADLINE if k in results}
    out.update({k: train[k] for k in HEADLINE_TRAIN if k in train})
    return out


def protocol_text(protocol: dict, n_test: int) -> str:
    """'IWAE k=500, 10000 of 10000 test images, seed 0, test data 1a2b3c4d5e6f7a8b'."""
    return (
        f"IWAE k={protocol['iwae_k']}, {protocol['iwae_n']} of {n_test} test images, "
        f"seed {protocol['seed']}, test data {protocol['data_digest']}"
    )


def log_to_mlflow(params, inp: Inputs, report: Report, seconds: float, plots_dir: Path) -> str:
    """Metrics, the test set (a dataset input), skip reasons (as tags), the pictures and the
    per-image NLLs into the training run; its id. The NLLs go under a name that says how they
    were measured, evaluation/per_image_nll/k<k>-n<n>-seed<seed>-<test digest>.npz (what a
    registered version names in its `per_image_nll` tag: another evaluate.seed never overwrites
    them), and, as the latest evaluate's, under evaluation/per_image_nll.npz. Each file records
    its nll, data_digest, iwae_k, iwae_n and seed. Wall time goes to MLflow only:
    metrics/evaluate.json stays a deterministic DVC output."""
    results, skipped, per_image = report.results, report.skipped, report.per_image
    run_id = read_json(paths.TRAIN_METRICS)["run_id"]
    protocol = {
        "data_digest": results["data_digest"],
        "iwae_k": params.evaluate.iwae_k,
        "iwae_n": results["iwae_n"],
        "seed": params.evaluate.seed,
    }
    # the name vaepipe.tracking.registry.per_image_path gives the same protocol
    name = "k{iwae_k}-n{iwae_n}-seed{seed}-{data_digest}.npz".format(**protocol)
    with tracking.run(params.mlflow.experiment, run_id=run_id), tempfile.TemporaryDirectory() as d:
        named = Path(d) / "per_image_nll" / name
        named.parent.mkdir()
        np.savez(named, nll=per_image, **protocol)
        tracking.log_artifact(named, "evaluation/per_image_nll")
        np.savez(Path(d) / "per_image_nll.npz", nll=per_image, **protocol)
        tracking.log_artifact(Path(d) / "per_image_nll.npz", "evaluation")
        tracking.log_metrics({k: v for k, v in results.items() if k.startswith("test/")})
        # how test/nll_iwae was measured: runs whose tags differ are not comparable by it
        tracking.set_tags({PROTOCOL_TAG: protocol_text(protocol, len(inp.split.x))})
        tracking.log_metrics({"evaluate_seconds": seconds})
        tracking.log_dataset(
            params.data.dataset,
            source=sources.source_location(params.data),
            digest=results["data_digest"],
            x=inp.split.x,
            y=inp.split.y,
            context="evaluation",
            tags={"split": "test", "examples": str(len(inp.split.x))},
        )
        if skipped:
            tracking.set_tags({f"evaluate.skipped.{k}": v for k, v in skipped.items()})
        tracking.log_artifacts(plots_dir, "plots")
    return run_id


def summary(report: Report, n_dims: int, seconds: float, run_id: str) -> str:
    """The figures a reviewer reads first, one line per question."""
    r, skipped = report.results, report.skipped

    def get(key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "skipped"

    lines = [
        f"evaluate: {r['n_test']} test images in {seconds:.0f} s",
        f"  likelihood      NLL (IWAE, k={r['iwae_k']}, first {r['iwae_n']} images) "
        f"{r['test/nll_iwae']:.2f} "
        f"± {r['test/nll_iwae_stderr']:.2f} nats = {r['test/bits_per_dim']:.4f} bits/dim; "
        f"ELBO {r['test/elbo']:.2f} = -(recon {r['test/recon']:.2f} + KL {r['test/kl']:.2f})",
        f"  reconstruction  MSE {r['test/mse']:.5f}, PSNR {r['test/psnr']:.2f} dB "
        f"(per-image mean {r['test/psnr_per_image']:.2f} dB), "
        f"NLL at z = mu {r['test/recon_nll_mu']:.2f} nats",
        f"  latent use      {r['test/active_units']}/{n_dims} active units; "
        f"I(x; z) {r['test/mutual_info']:.2f} nats (at most log N = {r['mutual_info_max']:.2f}); "
        f"KL(q(z) || p(z)) {r['test/aggregate_kl']:.2f} nats",
        f"  latent quality  probe {get('test/probe_accuracy', '.3f')}, "
        f"kNN {get('test/knn_accuracy', '.3f')}, KMeans NMI {get('test/kmeans_nmi', '.3f')} "
        f"ARI {get('test/kmeans_ari', '.3f')}, silhouette {get('test/silhouette', '.3f')}",
        f"  sample quality  FID {get('test/fid', '.2f')}, "
        f"precision {get('test/precision', '.3f')}, recall {get('test/recall', '.3f')} "
        "(classifier features; "
        + ", ".join(
            f"FID {k} {r[f'test/fid_{k}']:.2f}"
            for k in ("standard", "prior", "aggregate")
            if f"test/fid_{k}" in r
        )
        + ")",
        "  separation      AUROC of the scorer's NLL against the test images: "
        + ", ".join(
            f"{name} {v['auroc']:.3f}"
            for name, v in r["separation"].items()
            if isinstance(v, dict) and "auroc" in v
        ),
    ]
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    lines += [f"  skipped         {', '.join(names)}: {why}" for why, names in by_reason.items()]
    lines.append(
        f"  written         {paths.EVALUATE_METRICS}, {paths.EVALUATE_PLOTS}/; MLflow run {run_id}"
    )
    return "\n".join(lines)
