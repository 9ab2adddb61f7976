"""Sample quality: how close generated images are to real ones, in the feature space of a small
classifier trained once on the same data (the `classifier` stage).

- FID: the Fréchet distance between Gaussians fitted to the features of N samples and of the
  test images (Heusel et al. 2017), here in the 128-d penultimate layer of our classifier
  instead of Inception's (so the numbers compare between runs of this project, not with
  papers).
- precision / recall (Kynkäänniemi et al. 2019): the fraction of samples inside the k-nearest-
  neighbour balls of the real features (fidelity), and of real images inside the balls of the
  samples (coverage).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURES = 128  # width of the penultimate layer: the feature space of FID and precision/recall
PR_K = 3  # neighbours defining each feature's ball (Kynkäänniemi et al. use k = 3)
DISTANCE_ROWS = 1024  # rows per block of pairwise distances (1024 x 10,000 floats = 40 MB)
FEATURE_ROWS = 1000  # images per forward pass of the feature classifier (memory only)


class Classifier(nn.Module):
    """Two stride-2 convolutions and a dense feature layer: small, fast on a CPU, ~90% on
    Fashion-MNIST after a couple of epochs. Any image size (adaptive pooling to 7x7)."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int
) -> Classifier:
    """Adam on cross-entropy over grey images x [N, C, H, W] with labels y [N]."""
    torch.manual_seed(seed)
    model = Classifier(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def features(model: Classifier, x: torch.Tensor) -> np.ndarray:
    """[N, FEATURES] float64 features of images x in [0, 1]."""
    rows = FEATURE_ROWS
    return np.concatenate(
        [model.body(x[i : i + rows]).double().numpy() for i in range(0, len(x), rows)]
    )


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


@torch.no_grad()
def accuracy_per_label(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The classifier's accuracy on x [N, ...] separately for each label 0 .. max(y)."""
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return [float((pred[y == c] == c).float().mean()) for c in range(int(y.max()) + 1)]


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (eigenvalues below 0, from round-off,
    taken as 0)."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, F] and b [M, F].

    tr sqrt(C_a C_b) is computed as the sum of the square roots of the eigenvalues of the
    symmetric S C_b S (S = C_a^(1/2)), which has the same eigenvalues as C_a C_b: exact where
    the product is singular (fewer images than features), where scipy's sqrtm warns and needs
    an offset on the diagonal."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    d2 = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(max(d2, 0.0))  # a squared distance; round-off can leave it a hair below 0


def _kth_distances(a: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of a to its k-th nearest other row: [N]."""
    out = np.empty(len(a))
    sq = (a * a).sum(1)
    for i in range(0, len(a), DISTANCE_ROWS):
        d2 = sq[i : i + DISTANCE_ROWS, None] - 2 * a[i : i + DISTANCE_ROWS] @ a.T + sq[None, :]
        # column 0 after sorting is the row itself (distance 0)
        out[i : i + DISTANCE_ROWS] = np.sqrt(np.maximum(np.partition(d2, k, axis=1)[:, k], 0))
    return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of points within radius of at least one centre."""
    hit = np.zeros(len(points), bool)
    sq_c = (centres * centres).sum(1)
    for i in range(0, len(points), DISTANCE_ROWS):
        p = points[i : i + DISTANCE_ROWS]
        d2 = (p * p).sum(1)[:, None] - 2 * p @ centres.T + sq_c[None, :]
        hit[i : i + DISTANCE_ROWS] = (d2 <= radii[None, :] ** 2).any(1)
    return float(hit.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """(precision, recall) of fake features against real ones (Kynkäänniemi et al. 2019)."""
    precision = _inside(fake, real, _kth_distances(real, k))
    recall = _inside(real, fake, _kth_distances(fake, k))
    return precision, recall


FULL_COVARIANCE_DIMS = 256  # 10 components x 256^2 floats: 2.6 MB; at 100,000 dims, 373 GiB


def aggregate_posterior_sampler(mu: np.ndarray, components: int, seed: int):
    """A sampler of z from a Gaussian mixture fitted to training codes mu [N, D] (the
    aggregate posterior, which the decoder saw): n -> [n, D] float32."""
    from sklearn.mixture import GaussianMixture

    # a full covariance holds D x D numbers per component: for wider codes, a diagonal one
    kind = "full" if mu.shape[1] <= FULL_COVARIANCE_DIMS else "diag"
    gmm = GaussianMixture(min(components, len(mu)), covariance_type=kind, random_state=seed)
    gmm.fit(mu)
    weights = gmm.weights_ / gmm.weights_.sum()

    def sample(n: int) -> np.ndarray:
        """Through each component's precision Cholesky factor P (precision = P P^T), as
        z = mean + P^-T eps: no covariance is rebuilt, so none can come back not quite
        positive semi-definite (what GaussianMixture.sample then warns about)."""
        from scipy.linalg import solve_triangular

        rng = np.random.default_rng(seed)  # the same n codes every call
        counts = rng.multinomial(n, weights)
        out = []
        for k, count in enumerate(counts):
            eps = rng.standard_normal((count, mu.shape[1]))
            if kind == "full":
                step = solve_triangular(gmm.precisions_cholesky_[k].T, eps.T, lower=True).T
            else:
                step = eps / gmm.precisions_cholesky_[k]
            out.append(gmm.means_[k] + step)
        return np.concatenate(out).astype(np.float32)

    return sample


def quality(classifier, real_features: np.ndarray, images: torch.Tensor) -> dict[str, float]:
    """FID, precision and recall of generated images [N, C, H, W] against real features."""
    fake = features(classifier, images)
    precision, recall = precision_recall(real_features, fake)
    return {"fid": fid(real_features, fake), "precision": precision, "recall": recall}


def load_classifier(path) -> tuple[Classifier | None, str]:
    """(the classifier stage's model, "") or (None, why there is none)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return None, f"{path} is missing (run the classifier stage)"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "skipped" in payload:
        return None, payload["skipped"]
    model = Classifier(payload["channels"], payload["n_classes"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), ""
