"""The Exemplar prior through the public surface: `dvc repro` in a temp git repo with
`model.prior=exemplar`, then its graphs in onnxruntime, `vaepipe generate` and `vaepipe score`
on what the pipeline wrote, and the run in the MLflow store."""

import json
import sys

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from helpers import sh

from vaepipe.data.arrays import load_split, to_unit

OPTIONS = {
    "model.prior": "exemplar",
    "model.prior_components": 64,
    "train.epochs": 3,
    "evaluate.fid_n": 300,
}


@pytest.fixture(scope="module")
def repo(new_project):
    repo = new_project("exemplar", **OPTIONS)
    sh(repo, "dvc", "repro")
    return repo


def vaepipe(repo, *args):
    return sh(repo, sys.executable, "-m", "vaepipe.cli", *args, check=False, timeout=120)


def _session(repo, name):
    path = str(repo / "models" / name)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_the_graphs_carry_the_exemplars_and_prior_onnx_draws_near_them(repo):
    n_train = len(load_split(repo / "data/prepared/train.npz").x)
    prior = _session(repo, "prior.onnx")
    meta = prior.get_modelmeta().custom_metadata_map
    assert (meta["prior"], meta["exemplars"]) == ("exemplar", str(n_train))
    scorer_meta = _session(repo, "scorer.onnx").get_modelmeta().custom_metadata_map
    k = int(scorer_meta["scorer_k"])
    assert int(scorer_meta["max_batch"]) == max(1, 2**26 // (k * n_train))
    # eps = 0: each draw is the encoding of the exemplar that u picks, as encoder.onnx gives it
    train = to_unit(load_split(repo / "data/prepared/train.npz").x)
    picks = np.array([0, n_train // 2, n_train - 1])
    u = ((picks + 0.5) / n_train).astype(np.float32)
    (z,) = prior.run(None, {"eps": np.zeros((3, int(meta["latent_dim"])), np.float32), "u": u})
    mu, _ = _session(repo, "encoder.onnx").run(None, {"x": train[picks]})
    np.testing.assert_allclose(z, mu, atol=1e-4)
    export = json.loads((repo / "metrics/export.json").read_text())
    parity = {k: v for k, v in export.items() if k.startswith("parity/") and k.count("_") == 1}
    assert {"parity/prior_b257", "parity/scorer_b1", "parity/scorer_b257"} <= set(parity)
    assert max(v for k, v in parity.items() if "scorer" not in k) <= 1e-4, export
    assert max(v for k, v in parity.items() if "scorer" in k) <= 1e-2, export  # nats


def test_evaluate_scores_and_the_run_records_the_prior(repo, tmp_path):
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0 < ev["test/nll_iwae"] < 1000 and ev["test/nll_iwae"] <= -ev["test/elbo"]
    out = tmp_path / "s.npz"
    r = vaepipe(repo, "generate", "--n", "16", "--out", str(out))
    assert r.returncode == 0 and "of the exemplar prior" in r.stdout, r.stdout + r.stderr
    images, scored = tmp_path / "x.npz", tmp_path / "nll.npz"
    np.savez(images, x=load_split(repo / "data/prepared/test.npz").x[:40])
    r = vaepipe(repo, "score", str(images), "--out", str(scored))
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(scored) as f:
        assert f["nll"].shape == (40,) and np.isfinite(f["nll"]).all()
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("vaepipe").experiment_id])
    assert run.data.params["model.prior"] == "exemplar"
    assert "prior.log_var" not in run.data.params  # weights are not params
