"""Latent-quality scores on latents whose answer is known, and the latent paths of the pictures."""

import numpy as np
import pytest
import torch

from vaepipe.evaluation import latent

QUALITY = {"knn_k": 5, "seed": 0}


def labelled(n: int, n_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, n)


def exact_code(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Latents that encode the label exactly: a scaled one-hot, barely jittered."""
    noise = np.random.default_rng(seed).normal(0, 0.01, (len(y), 10))
    return 5.0 * np.eye(10)[y] + noise


def test_latents_that_encode_the_label_score_perfectly():
    y_train, y_test = labelled(1000, seed=1), labelled(500, seed=2)
    out = latent.latent_quality(
        exact_code(y_train, 1), y_train, exact_code(y_test, 2), y_test, **QUALITY
    )
    assert out.skipped == {}
    for name in ("probe_accuracy", "knn_accuracy", "kmeans_nmi", "kmeans_ari"):
        assert out.scores[name] == pytest.approx(1.0), name
    assert out.scores["silhouette"] > 0.95


def test_noise_latents_score_near_chance():
    rng = np.random.default_rng(0)
    y_train, y_test = labelled(2000, seed=1), labelled(1000, seed=2)
    out = latent.latent_quality(
        rng.normal(size=(2000, 8)), y_train, rng.normal(size=(1000, 8)), y_test, **QUALITY
    )
    assert out.scores["probe_accuracy"] < 0.15  # chance is 0.1
    assert out.scores["knn_accuracy"] < 0.15
    assert out.scores["kmeans_nmi"] < 0.05 and abs(out.scores["kmeans_ari"]) < 0.05
    assert out.scores["silhouette"] < 0.05


def test_probe_reads_digits_from_pixels():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    out = latent.latent_quality(x[:1200], y[:1200], x[1200:], y[1200:], **QUALITY)
    assert out.scores["probe_accuracy"] > 0.9 and out.scores["knn_accuracy"] > 0.9


def test_missing_labels_skip_with_a_reason():
    mu = np.random.default_rng(0).normal(size=(100, 4))
    y = labelled(100)
    none = latent.latent_quality(mu, None, mu, None, **QUALITY)
    assert none.scores == {}
    assert set(none.skipped) == {
        "probe_accuracy",
        "knn_accuracy",
        "kmeans_nmi",
        "kmeans_ari",
        "silhouette",
    }
    assert all("test set has no labels" in why for why in none.skipped.values())
    no_train = latent.latent_quality(mu, None, mu, y, **QUALITY)
    assert set(no_train.skipped) == {"probe_accuracy", "knn_accuracy"}
    assert "train set has no labels" in no_train.skipped["probe_accuracy"]
    assert set(no_train.scores) == {"kmeans_nmi", "kmeans_ari", "silhouette"}
    one_class = latent.latent_quality(mu, y, mu, np.zeros(100, dtype=int), **QUALITY)
    assert "fewer than 2 classes" in one_class.skipped["silhouette"]


def test_subsample_is_seeded_sorted_and_bounded():
    idx = latent.subsample(100, 10, seed=0)
    assert len(idx) == 10 and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, latent.subsample(100, 10, seed=0))
    assert np.array_equal(latent.subsample(5, 0, seed=0), np.arange(5))
    assert np.array_equal(latent.subsample(5, 10, seed=0), np.arange(5))


@pytest.mark.parametrize("d", [1, 2, 5])
def test_project_2d(d):
    # latents with one known direction of large variance, one of medium, the rest small
    rng = np.random.default_rng(0)
    scales = np.array([5.0, 2.0, 0.3, 0.2, 0.1])[:d]
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu = (rng.normal(size=(400, d)) * scales) @ rotation.T
    xy, names = latent.project_2d(mu)
    assert xy.shape == (400, 2) and len(names) == 2
    if d <= 2:
        assert np.array_equal(xy[:, :d], mu)  # the latents themselves, not a projection
        return
    var = xy.var(axis=0)
    assert names[0].startswith("PC 1") and var[0] > var[1]  # the first axis varies most
    # ...and the two axes are the two largest variance directions: 5^2 and 2^2 here
    assert var[0] == pytest.approx(25, rel=0.15) and var[1] == pytest.approx(4, rel=0.15)


def test_traversal_moves_one_dim_per_row():
    base = torch.tensor([0.5, -1.0, 2.0])
    values = torch.tensor([-1.0, 0.0, 1.0])
    z = latent.traversal_codes(base, [2, 0], values).reshape(2, 3, 3)
    assert torch.equal(z[0, :, 2], values) and torch.equal(z[1, :, 0], values)
    assert torch.equal(z[0, :, :2], base[:2].expand(3, 2))
    assert torch.equal(z[1, :, 1:], base[1:].expand(3, 2))


def test_interpolation_ends_at_both_codes_and_pairs_cross_classes(tiny_vae):
    a, b = torch.zeros(3), torch.ones(3)
    z = latent.interpolation_codes(a, b, 5)
    assert torch.equal(z[0], a) and torch.equal(z[-1], b) and torch.allclose(z[2], b / 2)
    y = np.array([0, 0, 0, 1, 2])
    pairs = latent.pick_pairs(y, 5, 4, seed=0)
    assert len(pairs) == 4 and all(y[i] != y[j] for i, j in pairs)
    assert all(i != j for i, j in latent.pick_pairs(None, 5, 3, seed=0))
    images = latent.interpolation_images(tiny_vae, torch.rand(5, 1, 8, 8), pairs, steps=6)
    assert images.shape == (4 * 8, 1, 8, 8)


def test_wide_latents_are_scored_on_their_first_principal_components():
    """A 100,000-dim probe would run for many minutes; the scores stay defined and bounded."""
    from vaepipe.evaluation import latent

    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 60), rng.integers(0, 3, 30)
    wide = latent.MAX_SCORED_DIMS * 4
    # as a wide VAE's codes are: a few active dims holding the class, the rest nearly constant
    mu_train, mu_test = (0.01 * rng.standard_normal((n, wide)) for n in (60, 30))
    mu_train[:, :3] += np.eye(3)[y_train] * 3 + 0.3 * rng.standard_normal((60, 3))
    mu_test[:, :3] += np.eye(3)[y_test] * 3 + 0.3 * rng.standard_normal((30, 3))
    scores = latent.latent_quality(mu_train, y_train, mu_test, y_test, knn_k=3, seed=0)
    assert set(scores.scores) >= {"probe_accuracy", "knn_accuracy", "kmeans_nmi", "silhouette"}
    assert all(-1 <= v <= 1 for v in scores.scores.values())
    assert scores.scores["knn_accuracy"] > 0.9  # the class is in the leading components
