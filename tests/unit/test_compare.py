"""`vaepipe runs`: the table and plot of a real MLflow store's runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import clean_env


@pytest.fixture
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("vaepipe", artifact_location=(tmp_path / "a").as_uri())
    for name, dim, beta, nll, status in [
        ("a", 2, 1.0, 263.6, "FINISHED"),
        ("b", 8, 1.0, 245.3, "FINISHED"),
        ("c", 8, 4.0, 251.0, "FINISHED"),
        ("d", 32, 1.0, None, "FAILED"),
    ]:
        run = client.create_run(exp, run_name=name)
        client.log_param(run.info.run_id, "model.latent_dim", dim)
        client.log_param(run.info.run_id, "train.beta", beta)
        if nll is not None:
            client.log_metric(run.info.run_id, "test/nll_iwae", nll)
            client.log_metric(run.info.run_id, "test/active_units", dim // 2)
        client.set_terminated(run.info.run_id, status)
    return uri


def vaepipe(uri, *args):
    exe = str(Path(sys.executable).parent / "vaepipe")
    return subprocess.run(
        [exe, "runs", *args],
        env=clean_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_table_sorted_by_metric_and_plot(store, tmp_path):
    out = tmp_path / "cmp.png"
    proc = vaepipe(store, "--sort", "test/nll_iwae", "--plot", str(out), "--x", "model.latent_dim")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:6]]
    assert rows == ["b", "c", "a", "d"]  # best NLL first, the failed run (no NLL) last
    assert "FAILED" in proc.stdout and "test/nll_iwae" in proc.stdout.splitlines()[0]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_sort_key_and_experiment_are_clear_errors(store):
    proc = vaepipe(store, "--sort", "test/nll")
    assert proc.returncode == 2 and "cannot sort by 'test/nll'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vaepipe(store, "--experiment", "nope")
    assert proc.returncode == 2 and "no experiment 'nope'" in proc.stderr


def test_nlls_measured_under_different_protocols_are_marked(store):
    import mlflow

    client = mlflow.MlflowClient(store)
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs(["1"])}
    full = "IWAE k=500, 10000 of 10000 test images, seed 0, test data 1a2b3c4d5e6f7a8b"
    quick = "IWAE k=50, 200 of 10000 test images, seed 0, test data 1a2b3c4d5e6f7a8b"
    for name, protocol in (("a", full), ("b", quick), ("c", full)):
        client.set_tag(runs[name], "test.nll_protocol", protocol)
    proc = vaepipe(store, "--sort", "test/nll_iwae")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[-1] == "protocol"  # the last column
    marks = {line.split()[0]: line.split()[-1] for line in lines[2:6]}
    assert marks["a"] == marks["c"] != marks["b"] and marks["d"] == "-"
    assert f"  {marks['a']}: {full}" in lines and f"  {marks['b']}: {quick}" in lines
    assert "different protocols" in proc.stdout
    # all measured alike: no column, no note
    client.set_tag(runs["b"], "test.nll_protocol", full)
    same = vaepipe(store, "--sort", "test/nll_iwae").stdout
    assert "protocol" not in same


def test_make_ui_prints_the_runs_page_in_model_training_mode(store):
    import mlflow_ui

    db = Path(store.removeprefix("sqlite:///"))
    exp = mlflow_ui.address(db)
    assert exp == "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert mlflow_ui.address(db, "another").endswith(
        "/#/experiments?workflowType=machine_learning"
    )


def test_runs_logged_before_and_after_the_curve_rename_share_a_column(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("vaepipe", artifact_location=(tmp_path / "a").as_uri())
    for name, key, value in [("old", "val/elbo", -250.5), ("new", "elbo/val", -240.25)]:
        run = client.create_run(exp, run_name=name)
        client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
    for asked in ("val/elbo", "elbo/val"):
        proc = vaepipe(uri, "--metrics", asked, "--sort", asked, "--desc")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].split() == ["run", "status", "elbo/val"], proc.stdout
        assert [line.split()[::2] for line in lines[2:4]] == [["new", "-240.2"], ["old", "-250.5"]]
