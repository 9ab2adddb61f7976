"""The evaluate stage's pictures of a model: reconstructions (and the worst ones), prior samples,
the latent space in 2-D, traversals of the most active dims, interpolations, the per-dim KL and
activity, and the training curves; drawn into one folder (plots/evaluate/ for the stage).

The model decodes here; plots.py only draws arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vaepipe import config, imagefiles, paths
from vaepipe.evaluation import latent, likelihood, plots
from vaepipe.fileio import read_json, write_json
from vaepipe.model.vae import VAE

TRAVERSAL_VALUES = torch.linspace(-3, 3, 7)  # values of the swept z_d, in prior std units
INTERPOLATION_STEPS = 10
INTERPOLATION_PAIRS = 6
SCATTER_POINTS = 5000  # more points only overplot
MAX_DIMS_SHOWN = 256  # bars per KL chart: a wider one is unreadable (and gigabytes)
ROW = 8  # images per row of the grids


class Pictures:
    """The pictures of `vae` on grey test images [N, C, H, W] (labels y [N] as numpy for the
    colours; `labels` on the device for a conditional model), written into `out`."""

    def __init__(self, vae: VAE, grey, *, y, labels, out: Path, ev: config.EvaluateConfig):
        self.vae, self.grey, self.y, self.labels, self.out, self.ev = vae, grey, y, labels, out, ev

    def _labels(self, idx):
        return None if self.labels is None else self.labels[idx]

    def _beside_reconstructions(self, idx: torch.Tensor) -> np.ndarray:
        grey, y = self.grey[idx], self._labels(idx)
        mu, _ = likelihood.encode_all(self.vae, grey, batch_size=self.ev.batch_size, y=y)
        return imagefiles.interleave_rows(grey.cpu().numpy(), latent.decode_mean(self.vae, mu, y))

    def images(self, x: torch.Tensor, mse: torch.Tensor) -> None:
        """Reconstructions beside inputs, the worst-reconstructed images (by per-image `mse`),
        and prior samples. x: what the likelihood is measured on (its device draws the noise)."""
        vae, ev, out = self.vae, self.ev, self.out
        n = min(ev.n_images, len(x))
        plots.save_grid(
            out / "reconstructions.png",
            self._beside_reconstructions(torch.arange(n)),
            f"First {n} test images (odd rows) and reconstructions E[x | z = mu(x)] (even rows)",
        )
        worst = torch.argsort(mse, descending=True)[:n]
        plots.save_grid(
            out / "worst_reconstructions.png",
            self._beside_reconstructions(worst),
            f"The {n} worst-reconstructed test images by per-image MSE "
            f"({mse[worst].min():.4f} to {mse[worst].max():.4f}); odd rows input, "
            "even rows reconstruction",
        )
        gen = torch.Generator(device=x.device).manual_seed(ev.seed)
        eps = torch.randn((n, vae.cfg.latent_dim), generator=gen, device=x.device)
        u = torch.rand(n, generator=gen, device=x.device)
        with torch.no_grad():
            z = vae.sample_prior(eps, u)
        prior = "N(0, I)" if vae.cfg.prior == "standard" else f"the learned {vae.cfg.prior} prior"
        # a conditional model: one label per row (8 to a row, labels 0, 1, ... cycling)
        rows = torch.arange(n, device=z.device) // ROW % max(1, vae.cfg.n_classes)
        y = rows if vae.cfg.conditional else None
        plots.save_grid(
            out / "samples.png",
            latent.decode_mean(vae, z, y),
            f"{n} samples from the prior: E[x | z], z ~ {prior}"
            + (" (row r: label r)" if y is not None else ""),
        )

    def latents(self, mu_grey, kl_d, act, class_names: list[str] | None) -> None:
        """2-D view coloured by label, traversals of the most active dims, interpolations."""
        vae, ev, out, y = self.vae, self.ev, self.out, self.y
        mu_np = mu_grey.cpu().numpy()
        xy, axes = latent.project_2d(mu_np)
        shown = latent.subsample(len(xy), SCATTER_POINTS, ev.seed)
        plots.latent_scatter(
            out / "latent_2d.png",
            xy[shown],
            None if y is None else y[shown],
            title=f"Test latents mu(x) in 2-D ({'PCA, ' if mu_np.shape[1] > 2 else ''}"
            f"{len(shown)} "
            + ("images), coloured by label" if y is not None else "images; no labels)"),
            axis_names=axes,
            class_names=class_names,
        )
        # Only active dims: an inactive one decodes to the same image all along its row. With
        # none active, the least dead ones still show that nothing changes.
        n_active = int((act > ev.active_threshold).sum())
        dims = torch.argsort(act, descending=True)[: min(ev.traversal_dims, n_active or 1)]
        dims = dims.tolist()
        values = TRAVERSAL_VALUES.to(mu_grey)
        z = latent.traversal_codes(mu_grey[0], dims, values)  # [n_dims * n_values, D]
        y0 = None if self.labels is None else self.labels[:1].expand(len(z))
        which = f"{len(dims)} most active" if n_active else "most active (none is active)"
        plots.save_grid(
            out / "traversals.png",
            latent.decode_mean(vae, z, y0),
            f"Traversals of the {which} dims around mu(test image 0): one row per dim z_d, "
            "set to the value below",
            ncols=len(values),
            row_labels=[f"z_{d} (KL {kl_d[d]:.2f})" for d in dims],
            col_labels=[f"{v:+g}" for v in values.tolist()],
        )
        pairs = latent.pick_pairs(y, len(self.grey), INTERPOLATION_PAIRS, ev.seed)
        plots.save_grid(
            out / "interpolation.png",
            latent.interpolation_images(vae, self.grey, pairs, INTERPOLATION_STEPS, self.labels),
            "Decoded interpolation from mu(a) to mu(b) between two test images per row "
            "(outer columns: the images a and b)",
            ncols=INTERPOLATION_STEPS + 2,
        )

    def charts(self, kl_d: torch.Tensor, act: torch.Tensor) -> dict[str, str]:
        """Training curves and per-dim KL / activity charts (and their data for DVC); what was
        skipped and why."""
        out, threshold = self.out, self.ev.active_threshold
        kl_np, act_np = kl_d.cpu().numpy(), act.cpu().numpy()
        # a chart a person reads: the MAX_DIMS_SHOWN dims with the most KL (all when fewer), in
        # dim order; kl_per_dim.json and metrics/evaluate.json have every dim
        shown = np.sort(np.argsort(-kl_np, kind="stable")[:MAX_DIMS_SHOWN])
        plots.kl_per_dim_bars(
            out / "kl_per_dim.png",
            kl_np[shown],
            act_np[shown],
            threshold,
            dims=shown,
            of=len(kl_np),
        )
        rows = [  # every dim (the page's sliders are ordered by them)
            {"dim": d, "kl": float(k), "activity": float(a), "active": bool(a > threshold)}
            for d, (k, a) in enumerate(zip(kl_np, act_np, strict=True))
        ]
        write_json(out / "kl_per_dim.json", rows)
        if not paths.CURVES.is_file():
            return {
                "plots/training_curves.png": f"{paths.CURVES} is missing (run the train stage)"
            }
        plots.training_curves(out / "training_curves.png", read_json(paths.CURVES))
        return {}
