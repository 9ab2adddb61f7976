"""The latent space seen through the posterior means `mu`: is it useful, and what does it hold?

Quality scores with scikit-learn, all label-based: a linear probe and kNN fit on train latents
and scored on test, KMeans NMI/ARI and the silhouette of the classes on test. When labels are
missing, each score is skipped with the reason, so the caller can record why a number is absent.
Also the latent paths the pictures decode: a 2-D projection, traversals and interpolations.
scikit-learn is imported inside the functions: importing vaepipe stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vaepipe.model.vae import VAE

# The probe is a plain multinomial logistic regression on standardised latents; L-BFGS reaches
# its optimum well within this many iterations on 10k x 32 latents.
PROBE_MAX_ITER = 1000
KMEANS_N_INIT = 10
# Wider latents are scored on their first this-many principal components (fit on the train
# latents): the probe's L-BFGS on 100,000 dims would run for many minutes, and few of them are
# ever active.
MAX_SCORED_DIMS = 512


@dataclass
class LatentScores:
    scores: dict[str, float] = field(default_factory=dict)  # metric name -> value
    skipped: dict[str, str] = field(default_factory=dict)  # metric name -> why it is absent


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` of n examples (all of them when size is 0 or >= n)."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def probe_accuracy(
    mu_train: np.ndarray, y_train: np.ndarray, mu_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test accuracy of a logistic-regression probe fit on train latents: linear decodability."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER))
    probe.fit(mu_train, y_train)
    return float(probe.score(mu_test, y_test))


def knn_accuracy(
    mu_train: np.ndarray,
    y_train: np.ndarray,
    mu_test: np.ndarray,
    y_test: np.ndarray,
    k: int,
) -> float:
    """Test accuracy of k-nearest-neighbour voting among train latents (Euclidean)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(mu_train)))
    return float(knn.fit(mu_train, y_train).score(mu_test, y_test))


def cluster_scores(mu: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    """KMeans with one cluster per class, compared with the classes (NMI, ARI); and the
    silhouette of the classes themselves in latent space (-1..1, higher = better separated)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import (
        adjusted_rand_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    n_classes = len(np.unique(y))
    clusters = KMeans(n_classes, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(mu)
    return {
        "kmeans_nmi": float(normalized_mutual_info_score(y, clusters)),
        "kmeans_ari": float(adjusted_rand_score(y, clusters)),
        "silhouette": float(silhouette_score(mu, y)),
    }


def _missing_labels(y: np.ndarray | None, split: str) -> str | None:
    """Why labels of `split` cannot be scored against, or None when they can."""
    if y is None:
        return f"the {split} set has no labels"
    if len(np.unique(y)) < 2:
        return f"the {split} set has fewer than 2 classes"
    return None


def latent_quality(
    mu_train: np.ndarray,
    y_train: np.ndarray | None,
    mu_test: np.ndarray,
    y_test: np.ndarray | None,
    *,
    knn_k: int,
    seed: int,
) -> LatentScores:
    """Every latent-quality score the labels allow, keyed as in docs/metrics.md without 'test/'."""
    out = LatentScores()
    mu_train, mu_test = _at_most_scored_dims(mu_train, mu_test, seed)
    no_test = _missing_labels(y_test, "test")
    no_train = no_test or _missing_labels(y_train, "train")
    if no_train:
        out.skipped.update({"probe_accuracy": no_train, "knn_accuracy": no_train})
    else:
        out.scores["probe_accuracy"] = probe_accuracy(mu_train, y_train, mu_test, y_test)
        out.scores["knn_accuracy"] = knn_accuracy(mu_train, y_train, mu_test, y_test, knn_k)
    if no_test:
        out.skipped.update({k: no_test for k in ("kmeans_nmi", "kmeans_ari", "silhouette")})
    else:
        out.scores.update(cluster_scores(mu_test, y_test, seed))
    return out


def _at_most_scored_dims(
    mu_train: np.ndarray, mu_test: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both sets of latents, projected on the first MAX_SCORED_DIMS principal components of
    the train latents (the test ones when there are none) when they are wider."""
    if mu_test.shape[1] <= MAX_SCORED_DIMS:
        return mu_train, mu_test
    from sklearn.decomposition import PCA

    basis = mu_train if len(mu_train) >= 2 else mu_test
    n = min(MAX_SCORED_DIMS, len(basis))
    pca = PCA(n_components=n, svd_solver="randomized", random_state=seed).fit(basis)
    return (pca.transform(mu_train) if len(mu_train) else mu_train), pca.transform(mu_test)


# --- latent paths for the pictures --------------------------------------------------------------


def project_2d(mu: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """[N, 2] view of [N, D] latents with axis names: the latents themselves when D <= 2 (padded
    with zeros for D = 1), else their first two principal components."""
    d = mu.shape[1]
    if d <= 2:
        xy = np.concatenate([mu, np.zeros((len(mu), 2 - d), mu.dtype)], axis=1)
        return xy, ("z_0", "z_1" if d == 2 else "(none: latent_dim = 1)")
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(mu)
    share = pca.explained_variance_ratio_
    return pca.transform(mu), (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%})")


@torch.no_grad()
def decode_mean(vae: VAE, z: torch.Tensor, y=None) -> np.ndarray:
    """E[x | z] (given labels y [M] for a conditional model) for z [M, D] as [M, C, H, W]
    numpy images."""
    return vae.mean(vae.decode(z, y)).cpu().numpy()


def traversal_codes(base: torch.Tensor, dims: list[int], values: torch.Tensor) -> torch.Tensor:
    """Codes that sweep one dim at a time through `values`, others held at `base` [D]:
    [len(dims) * len(values), D], row-major by dim (one picture row per dim)."""
    z = base.repeat(len(dims), len(values), 1)  # [n_dims, n_values, D]
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return z.reshape(-1, base.shape[-1])


def interpolation_codes(mu_a: torch.Tensor, mu_b: torch.Tensor, steps: int) -> torch.Tensor:
    """Evenly spaced codes on the segment from mu_a to mu_b [D], ends included: [steps, D]."""
    t = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype)[:, None]  # [S, 1]
    return (1 - t) * mu_a + t * mu_b


def pick_pairs(y: np.ndarray | None, n: int, n_pairs: int, seed: int) -> list[tuple[int, int]]:
    """Seeded pairs of distinct test indices (a, b); b has another label than a when labels
    allow, so the interpolation crosses classes."""
    rng = np.random.default_rng(seed)
    pairs = []
    for a in rng.choice(n, min(n_pairs, n), replace=False).tolist():
        other = np.flatnonzero(y != y[a]) if y is not None else np.array([], dtype=np.int64)
        if len(other) == 0:
            other = np.delete(np.arange(n), a)
        pairs.append((a, int(rng.choice(other))) if len(other) else (a, a))
    return pairs


def interpolation_images(
    vae: VAE, grey: torch.Tensor, pairs: list[tuple[int, int]], steps: int, y=None
) -> np.ndarray:
    """Per pair one row: image a, the decoded codes from mu(a) to mu(b), image b:
    [len(pairs) * (steps + 2), C, H, W]. A conditional model decodes the path with a's label."""
    ends_idx = [i for pair in pairs for i in pair]
    labels = None if y is None else y[ends_idx]
    with torch.no_grad():
        mu, _ = vae.encode(grey[ends_idx], labels)  # [2P, D]
    rows = []
    for p, (a, b) in enumerate(pairs):
        z = interpolation_codes(mu[2 * p], mu[2 * p + 1], steps)  # [S, D]
        ends = grey[[a, b]].cpu().numpy()
        path_y = None if labels is None else labels[2 * p].repeat(steps)
        rows += [ends[:1], decode_mean(vae, z, path_y), ends[1:]]
    return np.concatenate(rows)
