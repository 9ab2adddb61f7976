"""End to end: `dvc repro` in a temp git repo on tiny data with a real sqlite MLflow store."""

import sqlite3

import numpy as np
import pytest
from _project import PER_EPOCH_METRICS, make_project, set_params, sh

EPOCHS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_project(tmp_path_factory.mktemp("project"), **{"train.epochs": EPOCHS})
    first = sh(repo, "dvc", "repro")
    return repo, first


def test_repro_writes_every_output(repo):
    repo, first = repo
    for out in (
        "data/prepared/train.npz",
        "data/prepared/val.npz",
        "data/prepared/test.npz",
        "models/vae.pt",
        "models/encoder.onnx",
        "models/decoder.onnx",
        "metrics/train.json",
        "metrics/evaluate.json",
        "metrics/export.json",
        "plots/evaluate/reconstructions.png",
        "plots/evaluate/samples.png",
    ):
        assert (repo / out).is_file(), out
    assert "Traceback" not in first.stderr


def test_mlflow_run_holds_every_per_epoch_term(repo):
    repo, _ = repo
    db = sqlite3.connect(repo / "mlruns" / "mlflow.db")
    runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    run_id = runs[0][0]
    steps = dict(
        db.execute(
            "SELECT key, COUNT(*) FROM metrics WHERE run_uuid=? GROUP BY key", (run_id,)
        ).fetchall()
    )
    for key in PER_EPOCH_METRICS:
        assert steps.get(key) == EPOCHS, key
    for key in ("test/nll_iwae", "test/elbo", "test/recon", "test/kl", "test/mse"):
        assert steps.get(key) == 1, key
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid=?", (run_id,)))
    assert params["model.latent_dim"] == "4" and params["data.dataset"] == "digits"
    tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid=?", (run_id,)))
    assert tags["dataset"] == "digits" and tags["device"] == "cpu"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["onnx_provider"]
    assert "torch_version" in tags and "onnxruntime_version" in tags
    artifacts = repo / "mlruns" / "artifacts"
    assert list(artifacts.rglob("reconstructions.png")) and list(artifacts.rglob("MLmodel"))


def test_metrics_are_consistent(repo):
    import json

    repo, _ = repo
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert ev["test/elbo"] == pytest.approx(-(ev["test/recon"] + ev["test/kl"]), abs=1e-3)
    assert ev["test/nll_iwae"] <= -ev["test/elbo"] + 1.0  # IWAE (k=8) is no looser than the ELBO
    ex = json.loads((repo / "metrics/export.json").read_text())
    assert ex["provider"] == "CPUExecutionProvider" and ex["parity_max_abs_err"] < 1e-4


def test_onnx_files_run_in_onnxruntime(repo):
    import onnxruntime as ort

    repo, _ = repo
    enc = ort.InferenceSession(
        str(repo / "models/encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    dec = ort.InferenceSession(
        str(repo / "models/decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    mu, logvar = enc.run(None, {"x": np.random.rand(3, 1, 8, 8).astype(np.float32)})
    assert mu.shape == logvar.shape == (3, 4)
    (x_mean,) = dec.run(None, {"z": mu})
    assert x_mean.shape == (3, 1, 8, 8)


def test_second_repro_does_nothing_and_param_change_reruns_only_dependents(repo):
    repo, _ = repo
    again = sh(repo, "dvc", "repro")
    assert "Running stage" not in again.stdout
    set_params(repo, **{"evaluate.iwae_k": 4})
    changed = sh(repo, "dvc", "repro")
    ran = [line for line in changed.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'evaluate':"], changed.stdout
    set_params(repo, **{"evaluate.iwae_k": 8})


def test_bad_param_fails_cleanly_and_keeps_outputs(repo):
    repo, _ = repo
    before = (repo / "models/vae.pt").read_bytes()
    set_params(repo, **{"model.latent_dim": 0})
    try:
        proc = sh(repo, "dvc", "repro", check=False)
    finally:
        set_params(repo, **{"model.latent_dim": 4})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "error: param 'model.latent_dim' = 0 is out of range" in out
    assert "Traceback" not in out
    assert (repo / "models/vae.pt").read_bytes() == before
