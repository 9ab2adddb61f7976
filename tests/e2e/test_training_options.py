"""Training options through the whole pipeline: `dvc repro` with params only, MLflow histories of
beta, lr and the validation objective, the best epoch kept, ONNX parity, and a `dvc exp` switch."""

import json
import sqlite3

import numpy as np
import onnxruntime as ort
import pytest
from helpers import set_params, sh


def _history(repo, key):
    """Every value of a metric, runs in the order they started."""
    db = sqlite3.connect(repo / "mlruns" / "mlflow.db")
    rows = db.execute(
        "SELECT m.step, m.value FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
        "WHERE m.key=? ORDER BY r.start_time, m.step",
        (key,),
    ).fetchall()
    return [v for _, v in rows]


def _json(repo, name):
    return json.loads((repo / "metrics" / name).read_text())


def test_gated_conv_warmup_free_bits_plateau_and_early_stopping(tmp_path, new_project):
    repo = new_project(
        "project",
        **{
            "model.arch": "conv",
            "model.channels": [8, 16],
            "model.activation": "gated",  # gated convolutions, transposed ones and dense layers
            "train.epochs": 12,
            "train.lr": 0.02,  # too high on purpose: validation stalls, the plateau cuts it
            "train.warmup_epochs": 2,
            "train.free_bits": 0.1,
            "train.lr_schedule": "plateau",
            "train.lr_patience": 1,
            "train.lr_min": 0.001,
            "train.early_stopping": 3,
            "evaluate.iwae_n": 50,
        },
    )
    out = sh(repo, "dvc", "repro")
    assert "Traceback" not in out.stderr
    betas = _history(repo, "beta")
    epochs = len(betas)
    assert betas[:2] == pytest.approx([0.5, 1.0]) and set(betas[2:]) == {1.0}
    lrs = _history(repo, "lr")
    assert lrs[0] == 0.02 and min(lrs) < 0.02  # at least one cut
    best = _history(repo, "best_epoch")[-1]
    train = _json(repo, "train.json")
    assert train["epochs"] == epochs and train["best_epoch"] == best
    vals = _history(repo, "elbo/val")
    assert train["elbo/val"] == pytest.approx(max(vals)) == pytest.approx(vals[int(best) - 1])
    if epochs < 12:  # stopped early: three epochs after the best one
        assert epochs == best + 3
    ev = _json(repo, "evaluate.json")
    assert ev["iwae_n"] == 50 and np.isfinite(ev["test/nll_iwae"])
    assert _json(repo, "export.json")["parity_max_abs_err"] < 1e-4


def test_iwae_objective_with_cosine_lr_and_a_continuous_bernoulli_exp(tmp_path, new_project):
    repo = new_project(
        "project",
        **{
            "train.objective": "iwae",
            "train.iwae_k": 4,
            "train.epochs": 3,
            "train.lr_schedule": "cosine",
            "train.lr_min": 1e-5,
        },
    )
    sh(repo, "dvc", "repro", "train")  # the objective is training's alone; the exp runs all
    assert len(_history(repo, "iwae/val")) == 3
    assert _history(repo, "lr")[0] == pytest.approx(1e-3)
    train = _json(repo, "train.json")
    assert train["iwae/val"] > train["elbo/val"]
    # one param switch away: a continuous Bernoulli on grey pixels, as a DVC experiment
    flags = [
        "model.likelihood=continuous_bernoulli",
        "data.binarize=none",
        "train.objective=elbo",
        "train.lr_min=0.00001",  # DVC writes 1e-05, which YAML 1.1 reads back as a string
    ]
    sh(repo, "dvc", "exp", "run", *[a for f in flags for a in ("-S", f)])
    assert "lr_min: 1e-05" in (repo / "params.yaml").read_text()
    lrs = _history(repo, "lr")  # both runs' epochs: the exp's cosine ends above its floor
    assert lrs[-1] > 1e-5 and lrs[-1] < lrs[-2]
    ev = _json(repo, "evaluate.json")
    assert np.isfinite(ev["test/nll_iwae"]) and ev["test/elbo"] <= -ev["test/nll_iwae"] + 1e-6
    dec = ort.InferenceSession(
        str(repo / "models/decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    meta = dec.get_modelmeta().custom_metadata_map
    assert meta["likelihood"] == "continuous_bernoulli"
    (x_mean,) = dec.run(None, {"z": np.zeros((2, 4), np.float32)})
    assert ((0 < x_mean) & (x_mean < 1)).all()
    assert _json(repo, "export.json")["parity_max_abs_err"] < 1e-4


def test_a_changed_source_file_reruns_prepare(tmp_path, new_project):
    """data.root is a dependency of prepare: a user's npz (or IDX file) changing under it is
    seen by the next `dvc repro`; a file outside it is read, with a note that DVC won't see it."""
    rng = np.random.default_rng(0)
    repo = new_project("npz", **{"data.dataset": "npz", "data.npz_path": "data/raw/mine.npz"})
    raw = repo / "data" / "raw"  # git-ignored but for its README: the user's files go here
    np.savez(raw / "mine.npz", x=rng.integers(0, 256, (60, 6, 6), dtype=np.uint8))
    first = sh(repo, "dvc", "repro", "prepare")
    assert "digest" in first.stdout and "note:" not in first.stdout
    assert json.loads(sh(repo, "dvc", "status", "--json", "prepare").stdout or "{}") == {}
    np.savez(raw / "mine.npz", x=rng.integers(0, 256, (60, 6, 6), dtype=np.uint8))
    status = json.loads(sh(repo, "dvc", "status", "--json", "prepare").stdout)
    assert "prepare" in status, status
    again = sh(repo, "dvc", "repro", "prepare")
    assert "Running stage 'prepare'" in again.stdout
    outside = tmp_path / "elsewhere.npz"
    np.savez(outside, x=rng.integers(0, 256, (60, 6, 6), dtype=np.uint8))
    set_params(repo, **{"data.npz_path": str(outside)})
    noted = sh(repo, "dvc", "repro", "prepare")
    assert "note: " in noted.stdout and "outside data.root" in noted.stdout
