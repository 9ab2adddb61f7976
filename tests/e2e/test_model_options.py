"""The model options through the public surface: `dvc repro` of a conditional
two-layer VAE with a learned prior in a temp git repo, then its graphs in onnxruntime and the
`vaepipe` command on what the pipeline wrote."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from helpers import clean_env, sh

OPTIONS = {
    "model.arch": "hvae",
    "model.z1_dim": 8,
    "model.prior": "mog",
    "model.prior_components": 5,
    "model.conditional": True,
    "train.epochs": 4,
    "evaluate.fid_n": 300,
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, new_project):
    repo = new_project("options", **OPTIONS)
    sh(repo, "dvc", "repro")
    return repo


def vaepipe(repo, *args):
    return subprocess.run(
        [sys.executable, "-m", "vaepipe.cli", *args],
        cwd=repo, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_evaluate_reports_sample_quality_and_accuracy_per_label(repo):
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    quality = ev["sample_quality"]
    assert set(quality) >= {"standard", "prior", "aggregate", "n", "classifier_accuracy"}
    per_label = quality["prior"]["cond_accuracy_per_label"]
    assert len(per_label) == 10 and all(0 <= a <= 1 for a in per_label)
    assert ev["test/cond_accuracy"] == pytest.approx(np.mean(per_label))
    assert ev["test/fid"] == quality["prior"]["fid"] > 0
    assert np.isfinite(ev["test/nll_iwae"])
    classifier = json.loads((repo / "metrics/classifier.json").read_text())
    assert 0.5 < classifier["test_accuracy"] <= 1  # digits: a small CNN learns them at once


def test_graphs_follow_the_contract_of_the_options(repo):
    def io(name):
        path = str(repo / "models" / name)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = sess.get_modelmeta().custom_metadata_map
        return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()], meta

    inputs, outputs, meta = io("decoder.onnx")
    assert (inputs, outputs) == (["z", "y"], ["x_mean"])
    assert (meta["arch"], meta["prior"], meta["n_classes"]) == ("hvae", "mog", "10")
    assert io("prior.onnx")[:2] == (["eps", "u"], ["z"])
    assert io("encoder.onnx")[0] == ["x", "y"]
    assert io("scorer.onnx")[0] == ["x", "y"]
    export = json.loads((repo / "metrics/export.json").read_text())
    prior_parity = [v for k, v in export.items() if k.startswith("parity/prior")]
    assert prior_parity and max(prior_parity) <= 1e-4, export


def test_generate_draws_the_label_asked_for(repo, tmp_path):
    out = tmp_path / "threes.npz"
    r = vaepipe(repo, "generate", "--label", "3", "--n", "8", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(out) as f:
        assert f["x_mean"].shape == (8, 1, 8, 8) and f["z"].shape == (8, 4)
    bad = vaepipe(repo, "generate", "--label", "10", "--n", "8", "--out", str(tmp_path / "b.npz"))
    assert bad.returncode == 2
    text = bad.stdout + bad.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert errors == ["error: --label 10 is not a class of models/decoder.onnx: it has 10 (0..9)"]
    assert "Traceback" not in text
    assert not (tmp_path / "b.npz").exists()


def test_a_conditional_model_of_data_without_labels_is_one_line(tmp_path, new_project):
    images = np.random.default_rng(0).random((300, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "unlabelled.npz", x=images)
    repo = new_project(
        "repo",
        **{
            "data.dataset": "npz",
            "data.npz_path": str(tmp_path / "unlabelled.npz"),
            "model.conditional": True,
        },
    )
    r = subprocess.run(
        ["dvc", "repro", "train"], cwd=repo, env=clean_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    text = r.stdout + r.stderr
    assert r.returncode != 0
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: param 'model.conditional' is true but dataset 'npz' has no labels to condition on"
    ], text
    assert "Traceback" not in text and not (repo / "models/vae.pt").exists()
