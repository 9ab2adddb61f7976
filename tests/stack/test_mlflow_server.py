"""A real `mlflow server` on 127.0.0.1 as the team's store: two projects log to it at once (the
module's one server and its two runs), its REST API answers for them, and `mlflow ui` renders
their runs in Chromium."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import clean_env, free_port
from teamstack import stop_group, wait_for


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    log = (tmp_path / "server.log").open("w")
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
        env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # as team.py runs it
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def answers():
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{(tmp_path / 'server.log').read_text()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2):
            return True

    try:
        # a first start migrates the new database: slow on a machine busy with other tests
        wait_for("mlflow server answering /health", answers, timeout=240, every=0.5)
        yield url, store
    finally:
        stop_group(proc)
        log.close()


def api(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def two_runs(mlflow_server, new_project):
    """Two projects' `dvc repro`, at the same time, logging to the server: their repos."""
    url, _ = mlflow_server
    env = clean_env(MLFLOW_TRACKING_URI=url)
    repos = [new_project(f"repo{i}", **{"model.latent_dim": d}) for i, d in enumerate((2, 4))]
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
    return repos


def test_two_processes_log_to_a_shared_mlflow_server(mlflow_server, two_runs):
    url, store = mlflow_server
    repos = two_runs
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
        assert {"test/nll_iwae", "elbo/train"} <= {m["key"] for m in r["data"]["metrics"]}
    assert len(list((store / "artifacts").rglob("reconstructions.png"))) == 2
    # The same server is `mlflow ui`: its page and the runs view answer.
    with urllib.request.urlopen(url + "/", timeout=30) as resp:
        assert resp.status == 200 and b"<html" in resp.read().lower()


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_mlflow_ui_runs_page_screenshot(tmp_path, mlflow_server, two_runs):
    url, _ = mlflow_server
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
            f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning",  # as make ui
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    # A run's page opens on the ELBO of train and val side by side; no parity bars, no lr line
    run_id = api(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"][0][
        "info"
    ]["run_id"]
    sections = run_page_sections(tmp_path, f"{url}/#/experiments/{exp_id}/runs/{run_id}")
    assert sections[:2] == [("elbo", 2), ("kl", 2)], sections
    assert not any(name.startswith(("export", "lr")) for name, _ in sections), sections


def run_page_sections(tmp: Path, run_url: str) -> list[tuple[str, int]]:
    """The chart sections of a run's "Model metrics" page, in order: (name, charts)."""
    import re
    import time

    from chromium import chrome

    browser = chrome(tmp / "run-page", timeout=60)
    try:
        browser.get(f"{run_url}/model-metrics?workflowType=machine_learning")
        deadline, sections = time.monotonic() + 60, []
        while time.monotonic() < deadline and not sections:
            time.sleep(1)
            lines = browser.execute_script("return document.body.innerText").splitlines()
            sections = [
                (line, int(count[1:-1]))
                for line, count in zip(lines, lines[1:], strict=False)
                if re.fullmatch(r"\(\d+\)", count)
            ]
        return sections
    finally:
        browser.quit()
