"""Sweeps: queued dvc experiments with two workers land every run in the store and mark the
crashes; an unreachable tracking server fails a stage fast, naming it."""

import json
import time
from pathlib import Path

from helpers import clean_env, free_port, sh, wait_queue


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


def test_queued_sweep_with_two_workers_lands_every_run_and_marks_the_crashes(
    tmp_path, new_project
):
    repo = new_project("repo", **{"train.threads": 1})
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
    status = wait_queue(repo)
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
    # the same metrics in both (system/ metrics are sampled every 10 s: a slower run has more)
    finished = by_status["FINISHED"]
    keys = [{k for k in r["metrics"] if not k.startswith("system/")} for r in finished]
    assert keys[0] == keys[1] and {"test/nll_iwae", "elbo/val", "kl/train"} <= keys[0]
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exp_names = {e["name"] for rev in shown for e in (rev.get("experiments") or [])}
    assert {r["name"] for r in by_status["FINISHED"]} <= exp_names
    # what `dvc exp show` compares: the headline file only, a dozen figures at most
    for exp in (e for rev in shown for e in (rev.get("experiments") or [])):
        for rev in exp["revs"]:
            metrics = (rev.get("data") or {}).get("metrics") or {}
            assert set(metrics) <= {"metrics/summary.json"}, set(metrics)
            assert len((metrics.get("metrics/summary.json") or {}).get("data", {})) <= 12
    for r in by_status["FAILED"]:
        assert r["tags"]["error"].startswith("TrainingDiverged: ")
        assert "at epoch 1, batch" in r["tags"]["error"]


def test_unreachable_tracking_server_fails_fast_with_the_uri(tmp_path, new_project):
    repo = new_project("repo")
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = sh(
        repo, "python", "pipeline/train.py", check=False, env=clean_env(MLFLOW_TRACKING_URI=uri)
    )
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert f"MLflow tracking server {uri}" in proc.stderr and "unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / "models" / "vae.pt").exists()
