"""End to end: registry aliases through `vaepipe promote` after a `dvc queue` of experiments on
one dataset and on another; @champion stays the best model of the first dataset, is served,
and every bad input is one error line."""

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import clean_env, sh, wait_queue

# scikit-learn's digits, one epoch: the champion a longer run must beat
DIGITS = {"train.epochs": 1, "evaluate.iwae_n": 300, "export.scorer_k": 8}
VAEPIPE = str(Path(sys.executable).parent / "vaepipe")


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory) -> Path:
    """Another dataset of 8x8 images (an npz outside the project: a queued experiment runs in a
    temporary copy that has no data/raw files)."""
    from sklearn.datasets import load_digits

    path = tmp_path_factory.mktemp("other") / "inverted.npz"
    images = (255 - load_digits().images * 16).clip(0, 255).astype(np.uint8)[:600]
    np.savez(path, x=images)
    return path


@pytest.fixture(scope="module")
def repo(new_project):
    repo = new_project("promote", **DIGITS)
    sh(repo, "dvc", "repro", timeout=900)
    return repo


def promote(repo, *args, env=None):
    return sh(repo, VAEPIPE, "promote", *args, check=False, env=env)


def client(repo):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


def run_of(repo) -> str:
    return json.loads((repo / "metrics/train.json").read_text())["run_id"]


def test_the_first_model_becomes_champion_directly_and_export_moves_no_alias(repo):
    c = client(repo)
    assert c.get_registered_model("vae-decoder").aliases == {}  # export registered, no alias
    v = c.get_model_version("vae-decoder", "1")
    tags = v.tags
    assert tags["dataset"] == "digits" and tags["image_shape"] == "1,8,8"
    assert tags["nll_iwae_k"] == "8" and tags["nll_iwae_n"] == "300"
    assert float(tags["test_nll_iwae"]) > 0 and len(tags["test_data_digest"]) == 16
    # the model card is the version's description, generated from the run
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert f"{ev['test/nll_iwae']:.2f} ± {ev['test/nll_iwae_stderr']:.2f} nats" in v.description
    assert "## Contract" in v.description and "models:/vae-decoder@champion" in v.description
    assert "prior hole" in v.description and "`z`" in v.description
    proc = promote(repo)
    assert proc.returncode == 0, proc.stderr
    assert "no champion yet" in proc.stdout and "vae-decoder@champion -> v1" in proc.stdout
    for name in ("vae-decoder", "vae-encoder", "vae-scorer"):
        assert c.get_model_version_by_alias(name, "champion").run_id == run_of(repo)
    # the champion is no challenger of itself
    assert "challenger" not in c.get_registered_model("vae-decoder").aliases
    assert "@challenger" not in proc.stdout
    # the CLI runs it from the registry: the same samples as the graphs it was exported from
    gen = ("generate", "--n", "6", "--seed", "4")
    sh(repo, VAEPIPE, *gen, "--out", "local.npz")
    fetched = sh(repo, VAEPIPE, *gen, "--model", "models:/vae-decoder@champion", "--out", "r.npz")
    assert "models:/vae-decoder@champion is vae-decoder v1" in fetched.stdout
    with np.load(repo / "local.npz") as a, np.load(repo / "r.npz") as b:
        np.testing.assert_array_equal(a["x_mean"], b["x_mean"])
    missing = sh(repo, VAEPIPE, *gen, "--model", "models:/vae-decoder@nope", "--out", "n.npz",
                 check=False)  # fmt: skip
    assert missing.returncode != 0 and "has no such model version" in missing.stderr
    assert "Traceback" not in missing.stderr and not (repo / "n.npz").exists()


def test_queued_experiments_promote_only_a_significantly_better_model_of_the_same_data(
    repo, other_dataset
):
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "longer", "-S", "train.epochs=8")
    other = ["-S", "data.dataset=npz", "-S", f"data.npz_path={other_dataset}"]
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "other", *other)
    sh(repo, "dvc", "queue", "start", "-j", "2")
    states = wait_queue(repo)
    assert list(states.values()) == ["Success"] * 2, states
    c = client(repo)
    by_dataset = {c.get_model_version("vae-decoder", v).tags["dataset"]: v for v in ("2", "3")}
    assert set(by_dataset) == {"digits", "npz"}
    proc = promote(repo)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)  # the table, for the record
    out = proc.stdout
    longer = by_dataset["digits"]
    assert f"vae-decoder@champion -> v{longer}" in out
    assert "refused: dataset npz != digits (--force to override)" in out
    assert "better by" in out and "standard errors" in out
    champion = c.get_model_version_by_alias("vae-decoder", "champion")
    assert str(champion.version) == longer and champion.tags["dataset"] == "digits"
    for name in ("vae-encoder", "vae-scorer"):  # encoder and scorer move with it
        assert c.get_model_version_by_alias(name, "champion").run_id == champion.run_id
    # the newest candidate that is not the champion: the other dataset's, refused
    challenger = str(c.get_model_version_by_alias("vae-decoder", "challenger").version)
    assert challenger == by_dataset["npz"] != longer
    again = promote(repo)
    assert again.returncode == 0 and f"vae-decoder@champion stays v{longer}" in again.stdout


def _post(url, payload):
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_champion_is_what_serves(repo, tmp_path, serve):
    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    with serve("models:/vae-decoder@champion", uri, tmp_path / "serve.log") as url:
        status, body = _post(url, {"inputs": [[0.0] * 4]})
        assert status == 200 and np.array(body["predictions"]["x_mean"]).shape == (1, 1, 8, 8)
        status, body = _post(url, {"inputs": [[float("nan")] * 4]})
        assert status == 400 and "NaN" in body["message"]
    with serve("models:/vae-scorer@champion", uri, tmp_path / "scorer.log") as url:
        status, body = _post(url, {"inputs": [[[[0.0] * 8] * 8]]})
        assert status == 200 and np.array(body["predictions"]["nll"]).shape == (1,)
        status, body = _post(url, {"inputs": [[[[2.0] * 8] * 8]]})
        assert status == 400 and "[0, 1]" in body["message"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_inputs_are_one_error_line(repo, tmp_path):
    assert "--version 99 does not exist" in _one_error_line(promote(repo, "--version", "99"))
    line = _one_error_line(promote(tmp_path))  # a folder with no store: nothing is created
    assert "no MLflow store at" in line and not (tmp_path / "mlruns").exists()
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())
    line = _one_error_line(promote(tmp_path, "--model", "vae-decoder"))
    assert "no MLflow store" in line
    uri = f"http://127.0.0.1:{_closed_port()}"
    line = _one_error_line(promote(repo, env=clean_env(MLFLOW_TRACKING_URI=uri)))
    assert uri in line and "unreachable" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    os.makedirs(empty / "mlruns")
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{empty / 'mlruns' / 'mlflow.db'}").search_experiments()
    (empty / "params.yaml").write_text((repo / "params.yaml").read_text())
    assert "no registered versions of vae-decoder" in _one_error_line(promote(empty))


def test_deleted_runs_are_skipped_and_a_deleted_champion_is_named(repo):
    c = client(repo)
    sh(repo, "dvc", "exp", "run", "-S", "train.epochs=2")  # one more candidate, v4
    newest = max(int(v.version) for v in c.search_model_versions("name = 'vae-decoder'"))
    c.delete_run(c.get_model_version("vae-decoder", str(newest)).run_id)
    proc = promote(repo)
    assert proc.returncode == 0 and "skipped: its run is deleted" in proc.stdout
    champion = c.get_model_version_by_alias("vae-decoder", "champion")
    c.delete_run(champion.run_id)
    line = _one_error_line(promote(repo))
    assert f"champion vae-decoder v{champion.version}'s run {champion.run_id} is deleted" in line
    c.restore_run(champion.run_id)
