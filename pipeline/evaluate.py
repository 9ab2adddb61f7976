"""Stage evaluate: is the model good? Likelihood, reconstruction, posterior collapse, latent
quality, and the pictures.

Writes metrics/evaluate.json (every figure; `skipped` says why a metric is absent) and
plots/evaluate/ (PNGs, and kl_per_dim.json for `dvc plots show`), adds both to the training run
in MLflow, and prints a short summary.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaepipe import (
    checkpoint,
    config,
    data,
    imagefiles,
    latent,
    metrics,
    ood,
    paths,
    plots,
    quality,
    tracking,
)
from vaepipe.device import resolve_device, set_threads
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import read_json, write_json
from vaepipe.model import VAE

PLOTS = paths.EVALUATE_PLOTS
TRAVERSAL_VALUES = torch.linspace(-3, 3, 7)  # values of the swept z_d, in prior std units
INTERPOLATION_STEPS = 10
INTERPOLATION_PAIRS = 6
SCATTER_POINTS = 5000  # more points only overplot


@dataclass
class Inputs:
    x: torch.Tensor  # [N, C, H, W] what the likelihood is measured on (binarized if Bernoulli)
    grey: torch.Tensor  # [N, C, H, W] intensities in [0, 1], what a deployment encodes
    y: np.ndarray | None  # [N] labels, or None
    split: data.Split  # the prepared test split as stored
    labels: torch.Tensor | None = None  # [N] on the device, for a conditional model only


def load_test(vae: VAE, device: torch.device, seed: int) -> Inputs:
    test = data.load_split(paths.prepared("test"))
    grey = torch.from_numpy(data.to_unit(test.x)).to(device)
    if tuple(grey.shape[1:]) != tuple(vae.cfg.image_shape):
        raise data.DataError(
            f"test images {tuple(grey.shape[1:])} do not match the model's "
            f"{tuple(vae.cfg.image_shape)}; rerun the pipeline"
        )
    # The likelihood is measured on the data the model was trained to explain: one fixed
    # Bernoulli draw of the test set for a Bernoulli model (the benchmark standard).
    x = grey
    if vae.cfg.likelihood == "bernoulli":
        x = data.binarize(grey, torch.Generator(device=device).manual_seed(seed))
    labels = None
    if vae.cfg.conditional:
        if test.y is None:
            raise data.DataError("the model is conditional but the test set has no labels")
        labels = torch.from_numpy(test.y).to(device)
    return Inputs(x, grey, test.y, test, labels)


def train_latents(
    vae: VAE, device: torch.device, ev: config.EvaluateConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """mu of a seeded subsample of the training images (grey), with their labels."""
    train = data.load_split(paths.prepared("train"))
    idx = latent.subsample(len(train.x), ev.probe_train_size, ev.seed)
    grey = torch.from_numpy(data.to_unit(train.x[idx])).to(device)
    labels = None
    if vae.cfg.conditional:
        labels = torch.from_numpy(train.y[idx]).to(device)
    mu, _ = metrics.encode_all(vae, grey, ev.batch_size, labels)
    return mu.cpu().numpy(), None if train.y is None else train.y[idx]


def likelihood(vae: VAE, inp: Inputs, ev: config.EvaluateConfig):
    """IWAE NLL with its standard error, bits/dim and the ELBO terms; the test KL per dim; and
    each image's NLL (what `vaepipe promote` pairs between two models)."""
    elbo, kl_d = metrics.evaluate_elbo(vae, inp.x, ev.batch_size, ev.seed, inp.labels)
    # The IWAE bound on the first iwae_n test images (0 = all): k x n decoder passes, the
    # costliest figure here; the first 1,000 is the literature's usual subset.
    n = min(ev.iwae_n or len(inp.x), len(inp.x))
    labels = None if inp.labels is None else inp.labels[:n]
    log_px = metrics.iwae_log_likelihood(vae, inp.x[:n], ev.iwae_k, seed=ev.seed, y=labels)
    nll, nll_se = metrics.mean_and_stderr(-log_px)
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


def collapse(vae: VAE, mu, logvar, ev: config.EvaluateConfig) -> dict:
    """Active units, I(x; z) and KL(q(z) || p(z)) (against the model's prior) from the test
    posteriors."""
    n_active, _ = metrics.active_units(mu, ev.active_threshold)
    log_prior = None if vae.cfg.prior == "standard" else vae.prior.log_prob
    info = metrics.posterior_information(mu, logvar, seed=ev.seed, log_prior=log_prior)
    return {
        "test/active_units": n_active,
        "test/mutual_info": info["mutual_info"],
        "test/aggregate_kl": info["aggregate_kl"],
    }


def reconstruction(
    vae: VAE, inp: Inputs, ev: config.EvaluateConfig
) -> tuple[dict, metrics.Reconstruction]:
    rec = metrics.reconstruct(vae, inp.x, inp.grey, ev.batch_size, inp.labels)
    mse = rec.mse.mean().item()
    return {
        "test/recon_nll_mu": rec.recon_nll.mean().item(),
        "test/mse": mse,
        "test/psnr": metrics.psnr(mse),
        "test/psnr_per_image": rec.psnr.mean().item(),
    }, rec


def image_pictures(vae: VAE, inp: Inputs, rec: metrics.Reconstruction, n: int, seed: int) -> None:
    """Reconstructions beside inputs, the worst-reconstructed images, and prior samples."""

    def beside_reconstructions(idx: torch.Tensor) -> np.ndarray:
        grey = inp.grey[idx]
        y = None if inp.labels is None else inp.labels[idx]
        recon = latent.decode_mean(vae, metrics.encode_all(vae, grey, y=y)[0], y)
        return imagefiles.interleave_rows(grey.cpu().numpy(), recon)

    plots.save_grid(
        PLOTS / "reconstructions.png",
        beside_reconstructions(torch.arange(n)),
        f"First {n} test images (odd rows) and reconstructions E[x | z = mu(x)] (even rows)",
    )
    worst = torch.argsort(rec.mse, descending=True)[:n]
    plots.save_grid(
        PLOTS / "worst_reconstructions.png",
        beside_reconstructions(worst),
        f"The {n} worst-reconstructed test images by per-image MSE "
        f"({rec.mse[worst].min():.4f} to {rec.mse[worst].max():.4f}); odd rows input, "
        "even rows reconstruction",
    )
    gen = torch.Generator(device=inp.x.device).manual_seed(seed)
    eps = torch.randn((n, vae.cfg.latent_dim), generator=gen, device=inp.x.device)
    u = torch.rand(n, generator=gen, device=inp.x.device)
    with torch.no_grad():
        z = vae.sample_prior(eps, u)
    prior = "N(0, I)" if vae.cfg.prior == "standard" else f"the learned {vae.cfg.prior} prior"
    # a conditional model: one label per row (8 to a row, labels 0, 1, ... cycling)
    rows = torch.arange(n, device=z.device) // 8 % max(1, vae.cfg.n_classes)
    y = rows if vae.cfg.conditional else None
    plots.save_grid(
        PLOTS / "samples.png",
        latent.decode_mean(vae, z, y),
        f"{n} samples from the prior: E[x | z], z ~ {prior}"
        + (" (row r: label r)" if y is not None else ""),
    )


def latent_pictures(
    vae: VAE,
    inp: Inputs,
    mu_grey: torch.Tensor,
    kl_d: torch.Tensor,
    act: torch.Tensor,
    ev: config.EvaluateConfig,
    class_names: list[str] | None,
) -> None:
    """2-D view coloured by label, traversals of the most active dims, interpolations."""
    mu_np = mu_grey.cpu().numpy()
    xy, axes = latent.project_2d(mu_np)
    shown = latent.subsample(len(xy), SCATTER_POINTS, ev.seed)
    plots.latent_scatter(
        PLOTS / "latent_2d.png",
        xy[shown],
        None if inp.y is None else inp.y[shown],
        f"Test latents mu(x) in 2-D ({'PCA, ' if mu_np.shape[1] > 2 else ''}{len(shown)} "
        + ("images), coloured by label" if inp.y is not None else "images; no labels)"),
        axes,
        class_names,
    )
    # Only active dims: an inactive one decodes to the same image all along its row. With none
    # active, the least dead ones still show that nothing changes.
    n_active = int((act > ev.active_threshold).sum())
    dims = torch.argsort(act, descending=True)[: min(ev.traversal_dims, n_active or 1)].tolist()
    values = TRAVERSAL_VALUES.to(mu_grey)
    z = latent.traversal_codes(mu_grey[0], dims, values)  # [n_dims * n_values, D]
    y0 = None if inp.labels is None else inp.labels[:1].expand(len(z))
    which = f"{len(dims)} most active" if n_active else "most active (none is active)"
    plots.save_grid(
        PLOTS / "traversals.png",
        latent.decode_mean(vae, z, y0),
        f"Traversals of the {which} dims around mu(test image 0): one row per dim z_d, "
        "set to the value below",
        ncols=len(values),
        row_labels=[f"z_{d} (KL {kl_d[d]:.2f})" for d in dims],
        col_labels=[f"{v:+g}" for v in values.tolist()],
    )
    pairs = latent.pick_pairs(inp.y, len(inp.grey), INTERPOLATION_PAIRS, ev.seed)
    plots.save_grid(
        PLOTS / "interpolation.png",
        latent.interpolation_images(vae, inp.grey, pairs, INTERPOLATION_STEPS, inp.labels),
        "Decoded interpolation from mu(a) to mu(b) between two test images per row "
        "(outer columns: the images a and b)",
        ncols=INTERPOLATION_STEPS + 2,
    )


def chart_pictures(kl_d: torch.Tensor, act: torch.Tensor, threshold: float) -> dict:
    """Training curves and per-dim KL / activity charts (+ their data for DVC); returns what
    was skipped and why."""
    kl_np, act_np = kl_d.cpu().numpy(), act.cpu().numpy()
    plots.kl_per_dim_bars(PLOTS / "kl_per_dim.png", kl_np, act_np, threshold)
    rows = [
        {"dim": d, "kl": float(k), "activity": float(a), "active": bool(a > threshold)}
        for d, (k, a) in enumerate(zip(kl_np, act_np, strict=True))
    ]
    write_json(PLOTS / "kl_per_dim.json", rows)
    if not paths.CURVES.is_file():
        return {"plots/training_curves.png": f"{paths.CURVES} is missing (run the train stage)"}
    plots.training_curves(PLOTS / "training_curves.png", read_json(paths.CURVES))
    return {}


def separation(vae: VAE, inp: Inputs, params: config.Params) -> tuple[dict, dict]:
    """AUROCs of the scorer's NLL (export.scorer_k, export.scorer_seed: the noise scorer.onnx
    carries) between the first evaluate.ood_n grey test images and their corruptions or
    another dataset: (results, skipped)."""
    ev, ex = params.evaluate, params.export
    eps = metrics.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    y = None if inp.labels is None else inp.labels[: ev.ood_n]
    sets, why = ood.separation(vae, inp.grey[: ev.ood_n], eps, params.data.dataset, ev.seed, y)
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
        quality.aggregate_posterior_sampler(mu_train, 10, ev.seed)(n)
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


def log_to_mlflow(params, inp: Inputs, results: dict, skipped: dict, seconds, per_image):
    """Metrics, the test set (a dataset input), skip reasons (as tags), plots/evaluate/ and the
    per-image NLLs (evaluation/per_image_nll.npz) into the training run; its id. Wall time goes
    to MLflow only: metrics/evaluate.json stays a deterministic DVC output."""
    run_id = read_json(paths.TRAIN_METRICS)["run_id"]
    with tracking.run(params.mlflow.experiment, run_id=run_id), tempfile.TemporaryDirectory() as d:
        np.savez(
            Path(d) / "per_image_nll.npz",
            nll=per_image,
            data_digest=results["data_digest"],
            iwae_k=params.evaluate.iwae_k,
            seed=params.evaluate.seed,
        )
        tracking.log_artifact(Path(d) / "per_image_nll.npz", "evaluation")
        tracking.log_metrics({k: v for k, v in results.items() if k.startswith("test/")})
        tracking.log_metrics({"evaluate_seconds": seconds})
        tracking.log_dataset(
            params.data.dataset,
            data.source_location(params.data),
            results["data_digest"],
            inp.split.x,
            inp.split.y,
            "evaluation",
            tags={"split": "test", "examples": str(len(inp.split.x))},
        )
        if skipped:
            tracking.set_tags({f"evaluate.skipped.{k}": v for k, v in skipped.items()})
        tracking.log_artifacts(PLOTS, "plots")
    return run_id


def summary(r: dict, skipped: dict, n_dims: int, seconds: float, run_id: str) -> str:
    """The figures a reviewer reads first, one line per question."""

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
    lines.append(f"  written         {paths.EVALUATE_METRICS}, {PLOTS}/; MLflow run {run_id}")
    return "\n".join(lines)


@exit_on_user_error
def main() -> None:
    t0 = time.perf_counter()
    params = config.load(paths.PARAMS)
    ev = params.evaluate
    device = resolve_device(params.train.device)
    set_threads(params.train.threads)
    vae, payload = checkpoint.load(paths.MODEL, device)
    dataset = payload.get("params", {}).get("data", {}).get("dataset")
    inp = load_test(vae, device, ev.seed)

    results, kl_d, per_image = likelihood(vae, inp, ev)
    # Collapse diagnostics on the data the likelihood is measured on; latent quality and the
    # pictures on grey images, as a deployment would encode them.
    mu, logvar = metrics.encode_all(vae, inp.x, ev.batch_size, inp.labels)
    with torch.no_grad():
        results.update(collapse(vae, mu, logvar, ev))
    recon_results, rec = reconstruction(vae, inp, ev)
    results.update(recon_results)
    mu_grey, _ = metrics.encode_all(vae, inp.grey, ev.batch_size, inp.labels)
    mu_train, y_train = train_latents(vae, device, ev)
    scores = latent.latent_quality(
        mu_train, y_train, mu_grey.cpu().numpy(), inp.y, ev.knn_k, ev.seed
    )
    results.update({f"test/{k}": v for k, v in scores.scores.items()})
    skipped = {f"test/{k}": why for k, why in scores.skipped.items()}

    act = metrics.activity(mu)
    image_pictures(vae, inp, rec, min(ev.n_images, len(inp.x)), ev.seed)
    latent_pictures(vae, inp, mu_grey, kl_d, act, ev, plots.CLASS_NAMES.get(dataset))
    skipped.update(chart_pictures(kl_d, act, ev.active_threshold))
    separated, why = separation(vae, inp, params)
    results.update(separated)
    skipped.update(why)
    graded, why = sample_quality(vae, inp, params, mu_train)
    results.update(graded)
    skipped.update(why)

    seconds = time.perf_counter() - t0
    results.update(
        iwae_k=ev.iwae_k,
        n_test=len(inp.x),
        n_probe_train=len(mu_train),
        mutual_info_max=math.log(len(inp.x)),
        skipped=skipped,
        data_digest=data.digest(inp.split),
    )
    write_json(paths.EVALUATE_METRICS, results)
    run_id = log_to_mlflow(params, inp, results, skipped, seconds, per_image)
    print(summary(results, skipped, vae.cfg.latent_dim, seconds, run_id))


if __name__ == "__main__":
    main()
