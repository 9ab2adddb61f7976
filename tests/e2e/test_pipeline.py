"""End to end: `dvc repro` in a temp git repo on tiny data with a real sqlite MLflow store (the
shared tiny pipeline run of conftest.py)."""

import json
import os
import sqlite3
import stat
import sys

import numpy as np
import pytest
from helpers import PER_EPOCH_METRICS, PIPELINE, clean_env, set_params, sh
from helpers import PIPELINE_EPOCHS as EPOCHS


@pytest.fixture
def repo(tiny_pipeline):
    return tiny_pipeline


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
        "metrics/summary.json",
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
    assert "lr" not in steps  # constant: the param train.lr, not a flat curve
    assert not any(key.startswith("export/") for key in steps)  # parity: a table artifact
    for key in ("test/nll_iwae", "test/elbo", "test/recon", "test/kl", "test/mse"):
        assert steps.get(key) == 1, key
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid=?", (run_id,)))
    assert params["model.latent_dim"] == "4" and params["data.dataset"] == "digits"
    tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid=?", (run_id,)))
    assert tags["dataset"] == "digits" and tags["device"] == "cpu"
    assert tags["device_name"].endswith(" cores")  # the CPU's model and the cores it had
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["onnx_provider"]
    assert "torch_version" in tags and "onnxruntime_version" in tags
    artifacts = repo / "mlruns" / "artifacts"
    assert list(artifacts.rglob("reconstructions.png")) and list(artifacts.rglob("MLmodel"))


def test_metrics_are_consistent(repo):
    repo, _ = repo
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    # sample quality in the classifier stage's feature space, for N(0, I) and the codes' mixture
    clf = json.loads((repo / "metrics/classifier.json").read_text())
    assert (
        0.5 < clf["test_accuracy"] <= 1
        and ev["sample_quality"]["classifier_accuracy"] == clf["test_accuracy"]
    )
    assert ev["test/fid"] == ev["test/fid_standard"] > 0 and "test/fid_aggregate" in ev
    assert 0 <= ev["test/precision"] <= 1 and 0 <= ev["test/recall"] <= 1
    assert ev["test/elbo"] == pytest.approx(-(ev["test/recon"] + ev["test/kl"]), abs=1e-3)
    assert ev["test/nll_iwae"] <= -ev["test/elbo"] + 1.0  # IWAE (k=8) is no looser than the ELBO
    ex = json.loads((repo / "metrics/export.json").read_text())
    assert ex["provider"] == "CPUExecutionProvider" and ex["parity_max_abs_err"] < 1e-4


def test_dvc_lists_the_headline_figures_with_their_protocol_as_its_metrics(repo):
    repo, _ = repo
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    train = json.loads((repo / "metrics/train.json").read_text())
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert summary["test/nll_iwae"] == ev["test/nll_iwae"] and summary["iwae_k"] == 8
    assert summary["iwae_n"] == ev["iwae_n"] and summary["best_epoch"] == train["best_epoch"]
    assert 8 <= len(summary) <= 12
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    files = {f for rev in shown.values() for f in rev["data"]}
    assert files == {"metrics/summary.json"}, files
    db = sqlite3.connect(repo / "mlruns" / "mlflow.db")
    (protocol,) = db.execute("SELECT value FROM tags WHERE key='test.nll_protocol'").fetchone()
    assert protocol.startswith(f"IWAE k=8, {ev['iwae_n']} of {ev['n_test']} test images")


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
    # export reads evaluate's figures (version tags, model cards, metadata): it follows
    assert ran == ["Running stage 'evaluate':", "Running stage 'export':"], changed.stdout
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


def _run_id(repo) -> str:
    return json.loads((repo / "metrics/train.json").read_text())["run_id"]


def test_outputs_honour_the_umask(repo):
    repo, _ = repo
    files = [
        *repo.glob("metrics/*.json"),
        *repo.glob("data/prepared/*.npz"),
        *repo.glob("plots/evaluate/*"),
        *repo.glob("models/*.onnx"),
        repo / "models/vae.pt",
        repo / "plots/train/curves.json",
    ]
    assert len(files) > 20
    modes = {str(f.relative_to(repo)): stat.S_IMODE(f.stat().st_mode) for f in files}
    assert set(modes.values()) == {0o644}, modes


def test_run_shows_its_data_per_epoch_pictures_and_system_metrics(repo):
    import mlflow

    repo, _ = repo
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(_run_id(repo))
    inputs = {i.tags[0].value if i.tags else "": i.dataset for i in run.inputs.dataset_inputs}
    digests = json.loads((repo / "metrics/train.json").read_text())["data_digest"]
    test_digest = json.loads((repo / "metrics/evaluate.json").read_text())["data_digest"]
    by_context = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
        for i in run.inputs.dataset_inputs
    }
    assert inputs and set(by_context) == {"training", "validation", "evaluation"}
    assert by_context["training"].digest == digests["train"]
    assert by_context["validation"].digest == digests["val"]
    assert by_context["evaluation"].digest == test_digest
    assert {d.name for d in by_context.values()} == {"digits"}
    assert "digits.csv.gz" in by_context["training"].source
    # image_every 20 over 40 epochs: before training, epochs 1, 20 and the last, both grids
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    for key in ("samples", "reconstructions"):
        steps = sorted(
            int(p.split("+step+")[1].split("+")[0])  # images/<key>+step+<n>+timestamp+...
            for p in images
            if p.startswith(f"images/{key}+") and p.endswith(".png")
        )
        assert steps == [0, 1, 20, 40], images
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics
    assert run.data.metrics["epoch_images_seconds"] < run.data.metrics["train_seconds"]


def test_code_edits_rerun_exactly_the_stages_that_import_the_code(repo):
    repo, _ = repo

    def changed_stages() -> set[str]:
        status = json.loads(sh(repo, "dvc", "status", "--json").stdout or "{}")
        return set(status)

    sh(repo, "dvc", "repro")  # whatever earlier tests left changed
    assert changed_stages() == set()
    for module in ("cli.py", "inference/serving.py", "tracking/compare.py", "inference/site.py"):
        path = repo / "src" / "vaepipe" / module
        original = path.read_text()
        path.write_text(original + "\n# an appended comment\n")
        try:
            assert changed_stages() == set(), module
        finally:
            path.write_text(original)
    path = repo / "src" / "vaepipe" / "model" / "objectives.py"
    original = path.read_text()
    path.write_text(original + "\n# an appended comment\n")
    try:
        assert changed_stages() == {"train", "evaluate", "export"}
    finally:
        path.write_text(original)
    assert changed_stages() == set()


def test_a_model_too_large_for_memory_is_refused_before_any_allocation(repo):
    repo, _ = repo
    set_params(repo, **{"model.hidden": [1048576, 1048576]})
    try:
        proc = sh(repo, sys.executable, "pipeline/train.py", check=False, timeout=120)
    finally:
        set_params(repo, **{"model.hidden": PIPELINE["model.hidden"]})  # the shared run's
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: params 'model.hidden' = [1048576, 1048576]")
    assert "the limit here is" in err[0] and "Traceback" not in proc.stderr


def test_stages_run_by_the_venv_dvc_without_activating_it(repo, tmp_path):
    """`.venv/bin/dvc repro` from a shell whose `python3` is the system one (no packages)."""
    repo, _ = repo
    system_python = "/usr/bin/python3"
    if (
        not os.path.exists(system_python)
        or not sh(repo, system_python, "-c", "import numpy", check=False).returncode
    ):
        pytest.skip("no system python3 without numpy to stand in for an unactivated shell")
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")
    env = {k: v for k, v in clean_env().items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    # no .venv in this project: one line saying what to do, no traceback
    proc = sh(repo, dvc, "repro", "-f", "-s", "prepare", env=env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "cannot import" in proc.stderr and "make install" in proc.stderr
    # with the project's .venv (here a stand-in that runs the tests' interpreter): it runs
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    venv_python.chmod(0o755)
    try:
        proc = sh(repo, dvc, "repro", "-f", "-s", "prepare", env=env, check=False)
    finally:
        venv_python.unlink()
    assert proc.returncode == 0, proc.stderr
    assert "prepare: train" in proc.stdout
