"""Sample quality (vaepipe.quality): FID and precision/recall against their definitions, the
classifier that defines the feature space, and the aggregate-posterior sampler."""

import warnings

import numpy as np
import pytest
import torch

from vaepipe.evaluation import quality


def test_fid_is_the_frechet_distance_of_the_fitted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20_000, 2))
    b = rng.normal(0, 1, (20_000, 2)) * [1.0, 2.0] + [3.0, 0.0]
    # means 3 apart; covariances I and diag(1, 4): ||dm||^2 + tr(I + S - 2 S^1/2) = 9 + 1
    assert quality.fid(a, b) == pytest.approx(10.0, rel=0.03)
    assert quality.fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fid_agrees_with_scipys_sqrtm_and_stays_exact_and_silent_when_singular():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 20))
    b = rng.normal(size=(400, 20)) @ rng.normal(size=(20, 20)) * 0.5 + 1
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root)
    assert quality.fid(a, b) == pytest.approx(expected, rel=1e-9)
    # fewer images than features: C_a C_b is singular, where sqrtm warns "Matrix is singular"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
        assert np.isfinite(quality.fid(a, b)) and quality.fid(a, a) == pytest.approx(0, abs=1e-4)


def test_precision_and_recall_measure_fidelity_and_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (2000, 8))
    same = rng.normal(0, 1, (2000, 8))
    p, r = quality.precision_recall(real, same)
    assert p > 0.85 and r > 0.85  # the same distribution: most of each inside the other
    far = rng.normal(20, 1, (500, 8))
    assert quality.precision_recall(real, far) == (0.0, 0.0)
    # samples from one corner of the real data: faithful (precision) but not covering (recall)
    corner = real[real[:, 0] > 1.0][:300] + rng.normal(0, 0.01, (300, 8))
    p, r = quality.precision_recall(real, corner)
    assert p > 0.9 and r < 0.5


def test_kth_distance_is_to_the_kth_other_point():
    a = np.array([[0.0], [1.0], [3.0], [7.0]])
    # from 0: others at 1, 3, 7 -> the 2nd nearest is 3; from 3: at 2, 3, 4 -> 3
    assert quality._kth_distances(a, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_the_classifier_learns_digits_and_its_features_have_the_documented_width():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    model = quality.train_classifier(x[:1400], y[:1400], epochs=15, batch_size=64, lr=3e-3, seed=0)
    assert quality.accuracy(model, x[1400:], y[1400:]) > 0.8
    assert quality.features(model, x[:5]).shape == (5, quality.FEATURES)
    again = quality.train_classifier(x[:1400], y[:1400], epochs=1, batch_size=64, lr=3e-3, seed=0)
    twice = quality.train_classifier(x[:1400], y[:1400], epochs=1, batch_size=64, lr=3e-3, seed=0)
    assert np.array_equal(quality.features(again, x[:5]), quality.features(twice, x[:5]))


def test_aggregate_posterior_sampler_is_seeded_and_fits_the_codes():
    rng = np.random.default_rng(0)
    mu = np.r_[rng.normal(-4, 0.5, (500, 2)), rng.normal(4, 0.5, (500, 2))]
    sample = quality.aggregate_posterior_sampler(mu, 2, seed=0)
    z = sample(4000)
    assert np.array_equal(z, sample(4000)) and z.dtype == np.float32
    assert abs((z[:, 0] > 0).mean() - 0.5) < 0.05 and abs(np.abs(z[:, 0]).mean() - 4) < 0.1


def test_aggregate_posterior_samples_keep_the_correlations_and_warn_of_nothing():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(2000, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1e-4]]) + 2
    with warnings.catch_warnings():  # a nearly flat direction: sklearn's sample() warned here
        warnings.simplefilter("error")
        z = quality.aggregate_posterior_sampler(mu, 1, seed=0)(20_000)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.cov(mu, rowvar=False), atol=0.05)


def test_wide_codes_get_a_diagonal_mixture_of_bounded_size():
    """At 100,000 latent dims a full covariance per component would be 373 GiB."""
    mu = np.random.default_rng(0).standard_normal((40, quality.FULL_COVARIANCE_DIMS + 1))
    sample = quality.aggregate_posterior_sampler(mu.astype(np.float32), 3, seed=0)
    assert sample(5).shape == (5, quality.FULL_COVARIANCE_DIMS + 1)
