"""Sweeps and shared stores: queued dvc experiments, a real `mlflow server`, `mlflow ui`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _project import clean_env, make_project, sh

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_queue_done(repo: Path, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not any(s in status for s in ("Running", "Queued")) and "0 active" in status:
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout}s:\n{status}")


def runs_in_sqlite(db: Path) -> list[dict]:
    import sqlite3

    con = sqlite3.connect(db)
    out = []
    for run_id, name, status in con.execute("SELECT run_uuid, name, status FROM runs"):
        tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid=?", (run_id,)))
        metrics = {
            k
            for (k,) in con.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid=?", (run_id,))
        }
        params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid=?", (run_id,)))
        out.append(
            {"name": name, "status": status, "tags": tags, "metrics": metrics, "params": params}
        )
    return out


def test_queued_sweep_with_two_workers_lands_every_run_and_marks_the_crashes(tmp_path):
    repo = make_project(tmp_path / "repo", **{"train.threads": 1})
    # lr 1e7 diverges within the first epoch: two of the four experiments crash mid-sweep.
    sh(
        repo,
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        "model.latent_dim=2,4",
        "-S",
        "train.lr=0.001,10000000.0",
    )
    sh(repo, "dvc", "queue", "start", "-j", "2")
    status = wait_queue_done(repo)
    runs = runs_in_sqlite(repo / "mlruns" / "mlflow.db")
    assert len(runs) == 4, (runs, status)
    assert not [r for r in runs if r["status"] == "RUNNING"]
    by_status = {}
    for r in runs:
        by_status.setdefault(r["status"], []).append(r)
        assert r["tags"]["dvc_exp_name"] == r["name"]  # run name = DVC experiment name
        assert r["tags"]["mlflow.source.git.commit"] == r["tags"]["dvc_baseline_rev"]
        assert r["params"]["train.threads"] == "1"
    assert len(by_status["FINISHED"]) == 2 and len(by_status["FAILED"]) == 2
    assert {r["params"]["train.lr"] for r in by_status["FAILED"]} == {"10000000.0"}
    keys = [r["metrics"] for r in by_status["FINISHED"]]
    assert keys[0] == keys[1] and {"test/nll_iwae", "val/elbo", "train/kl"} <= keys[0]
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exp_names = {e["name"] for rev in shown for e in (rev.get("experiments") or [])}
    assert {r["name"] for r in by_status["FINISHED"]} <= exp_names
    for r in by_status["FAILED"]:
        assert r["tags"]["error"].startswith("TrainingDiverged: ")
        assert "at epoch 1, batch" in r["tags"]["error"]


@pytest.fixture
def mlflow_server(tmp_path):
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError("mlflow server did not start") from None
            time.sleep(0.5)
    yield url, store
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def api(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_two_processes_log_to_a_shared_mlflow_server(tmp_path, mlflow_server):
    url, store = mlflow_server
    env = clean_env(MLFLOW_TRACKING_URI=url)
    repos = [
        make_project(tmp_path / f"repo{i}", **{"train.threads": 1, "model.latent_dim": d})
        for i, d in enumerate((2, 4))
    ]
    procs = [
        subprocess.Popen(
            ["dvc", "repro"],
            cwd=r,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in repos
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    assert not (repos[0] / "mlruns").exists()  # nothing went to a local store
    exp = api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=vaepipe")
    exp_id = exp["experiment"]["experiment_id"]
    runs = api(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    assert sorted(r["info"]["status"] for r in runs) == ["FINISHED", "FINISHED"]
    dims = sorted(
        next(p["value"] for p in r["data"]["params"] if p["key"] == "model.latent_dim")
        for r in runs
    )
    assert dims == ["2", "4"]
    for r in runs:
        assert {"test/nll_iwae", "train/elbo"} <= {m["key"] for m in r["data"]["metrics"]}
    assert len(list((store / "artifacts").rglob("reconstructions.png"))) == 2
    # The same server is `mlflow ui`: its page and the runs view answer.
    with urllib.request.urlopen(url + "/", timeout=30) as resp:
        assert resp.status == 200 and b"<html" in resp.read().lower()


def test_unreachable_tracking_server_fails_fast_with_the_uri(tmp_path):
    repo = make_project(tmp_path / "repo")
    sh(repo, "dvc", "repro", "prepare")
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = sh(
        repo, "python", "pipeline/train.py", check=False, env=clean_env(MLFLOW_TRACKING_URI=uri)
    )
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert f"MLflow tracking server {uri}" in proc.stderr and "unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / "models" / "vae.pt").exists()


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_mlflow_ui_runs_page_screenshot(tmp_path, mlflow_server):
    url, _ = mlflow_server
    repo = make_project(tmp_path / "repo", **{"train.threads": 1})
    sh(repo, "dvc", "repro", env=clean_env(MLFLOW_TRACKING_URI=url))
    exp_id = api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=vaepipe")[
        "experiment"
    ]["experiment_id"]
    shot = Path(os.environ.get("VAEPIPE_SCREENSHOT", tmp_path / "runs.png"))
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--window-size=1600,1000",
            "--virtual-time-budget=15000",
            f"--screenshot={shot}",
            f"{url}/#/experiments/{exp_id}/runs",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
