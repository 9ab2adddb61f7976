"""`vaepipe tune` on the tiny project, through the command line, DVC, the MLflow store and the
study's database: trials as DVC experiments and MLflow runs nested under the study's run,
pruning, the summary, the best trial brought back, a study continued, a worker killed
outright, and bad input refused before any trial."""

import os
import signal
import sqlite3
import subprocess
import time

import pytest
import yaml
from helpers import TINY_STUDY, clean_env, sh, trial_states, tune_project

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tune(repo, *args, timeout=900):
    return sh(repo, "vaepipe", "tune", *args, check=False, timeout=timeout)


def runs(repo) -> list[dict]:
    db = sqlite3.connect(repo / "mlruns" / "mlflow.db")
    rows = db.execute("SELECT run_uuid, name, status FROM runs WHERE lifecycle_stage='active'")
    out = []
    for run_id, name, status in rows.fetchall():
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid=?", (run_id,)))
        out.append({"id": run_id, "name": name, "status": status, "tags": tags})
    return out


def storage(repo) -> str:
    return f"sqlite:///{repo / 'tuning' / 'optuna.db'}"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    repo = tune_project(tmp_path_factory.mktemp("tune") / "repo")
    proc = tune(repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return repo, proc


def test_trials_are_dvc_experiments_and_mlflow_runs_under_the_study(study):
    repo, proc = study
    out = proc.stdout
    assert "trial 0: complete" in out and "trial 1: pruned at epoch 2" in out, out
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    states = dict(trial_states(storage(repo), "tiny"))
    assert states[0] == "COMPLETE" and states[1] == "PRUNED" and len(states) == 3
    found = runs(repo)
    parent = [r for r in found if r["tags"].get("vaepipe.role") == "study"]
    assert len(parent) == 1 and parent[0]["status"] == "FINISHED"
    trials = {int(r["tags"]["vaepipe.trial"]): r for r in found if "vaepipe.trial" in r["tags"]}
    assert sorted(trials) == [0, 1, 2]
    for number, run in trials.items():
        assert run["tags"]["mlflow.parentRunId"] == parent[0]["id"]
        assert run["name"] == f"tiny-{number}"
        want = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[states[number]]
        assert run["status"] == want, (number, run)
    assert "TrialPruned" in trials[1]["tags"]["error"]
    # only trials that ran whole are experiments: a pruned one has no model to bring back
    names = sh(repo, "dvc", "exp", "list", "--name-only").stdout.split()
    assert "tiny-0" in names and "tiny-1" not in names


def test_the_summary_names_the_best_trial_and_is_on_the_studys_run(study):
    repo, proc = study
    summary = (repo / "tuning" / "tiny" / "summary.md").read_text()
    import optuna

    best = optuna.load_study(study_name="tiny", storage=storage(repo)).best_trial
    assert f"trial {best.number}: {best.value:.2f} |" in summary.splitlines()[2]
    assert f"dvc exp apply tiny-{best.number}" in summary and summary.strip() in proc.stdout
    assert (repo / "tuning" / "tiny" / "history.png").read_bytes()[:4] == b"\x89PNG"
    parent = next(r for r in runs(repo) if r["tags"].get("vaepipe.role") == "study")
    db = sqlite3.connect(repo / "mlruns" / "mlflow.db")
    keys = {k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid=?", (parent["id"],))}
    assert {"best_nll", "trials_complete", "trials_pruned"} <= keys
    art = repo / "mlruns" / "artifacts"
    assert list(art.rglob(f"{parent['id']}/artifacts/study/summary.md"))
    # vaepipe runs --study: the trials, their searched params and what judged them
    table = sh(repo, "vaepipe", "runs", "--study", "tiny", "--sort", "trial").stdout
    header, _, *rows = table.splitlines()
    assert header.split()[:5] == ["run", "status", "trial", "model.latent_dim", "train.lr"]
    assert [r.split()[0] for r in rows[:3]] == ["tiny-0", "tiny-1", "tiny-2"]
    assert "elbo/val" in header


def test_the_best_trial_comes_back_with_dvc_exp_apply_and_serves(study):
    repo, _ = study
    sh(repo, "dvc", "exp", "apply", "tiny-0")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["lr"] == 0.01
    sh(repo, "dvc", "repro", timeout=900)  # its evaluation and ONNX export
    assert "train" not in sh(repo, "dvc", "status").stdout
    out = repo / "samples.png"
    sh(repo, "vaepipe", "generate", "--n", "4", "--out", str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"
    sh(repo, "git", "checkout", "--", "params.yaml")


def test_tune_again_continues_the_study(study):
    repo, _ = study
    proc = tune(repo, "--trials", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    states = trial_states(storage(repo), "tiny")
    assert [n for n, _ in states] == [0, 1, 2, 3]  # numbered on, each trial once
    assert "study tiny: " in proc.stdout


def test_a_worker_killed_outright_leaves_nothing_running_and_the_study_resumes(study):
    repo, _ = study
    before = len(trial_states(storage(repo), "tiny"))
    env = clean_env()
    worker = subprocess.Popen(
        ["vaepipe", "tune", "--trials", "5"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = repo / "tuning" / "tiny" / f"trial-{before}.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "epoch" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    assert "epoch" in log.read_text(), "the trial never started training"
    os.kill(worker.pid, signal.SIGKILL)  # the worker only: its dvc is told by the kernel
    worker.wait(30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(r["status"] == "RUNNING" for r in runs(repo)):
        time.sleep(1)
    assert not [r["name"] for r in runs(repo) if r["status"] == "RUNNING"]
    assert dict(trial_states(storage(repo), "tiny"))[before] == "RUNNING"  # until its heartbeat
    time.sleep(10)  # older than the grace period (4 heartbeats of 2 s)
    proc = tune(repo, "--trials", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    states = trial_states(storage(repo), "tiny")
    assert dict(states)[before] == "FAIL" and "RUNNING" not in dict(states).values()
    finished = [n for n, s in states if s in ("COMPLETE", "PRUNED")]
    # the four finished before, and one after the killed trial failed
    assert len(finished) == 5 and len({n for n, _ in states}) == len(states)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_worker_stops_its_trial_and_restores_params(study, sig):
    repo, _ = study
    params = (repo / "params.yaml").read_text()
    before = len(trial_states(storage(repo), "tiny"))
    worker = subprocess.Popen(
        ["vaepipe", "tune", "--trials", str(before + 5)],
        cwd=repo,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = repo / "tuning" / "tiny" / f"trial-{before}.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "epoch" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    worker.send_signal(sig)
    out, err = worker.communicate(timeout=180)
    assert worker.returncode == 130 and err.strip().endswith("interrupted"), err
    assert "Traceback" not in err
    assert dict(trial_states(storage(repo), "tiny"))[before] == "FAIL"
    assert not [r["name"] for r in runs(repo) if r["status"] == "RUNNING"]
    assert (repo / "params.yaml").read_text() == params


BAD_SPACES = [
    ({"space": {"train.speed": {"low": 1, "high": 2}}}, "unknown param 'train.speed'"),
    ({"space": {"data.val_fraction": {"low": 0.1, "high": 1.5}}}, "1.5 is not allowed"),
    ({"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "a log scale needs low > 0"),
    ({"space": {"train.batch_size": {"low": 16.5, "high": 64}}}, "needs integer bounds"),
    ({"space": {"model.prior": {"choices": ["standard", "flow"]}}}, "'flow' is not allowed"),
    ({"study": "no spaces allowed"}, "study must be a name"),
    ({"trials": 0}, "trials must be a positive number"),
    ({"pruning": {"min_epochs": -1}}, "pruning.min_epochs must be an integer"),
    ({"enqueue": [{"train.epochs": 3}]}, "are not in the space"),
    ({"storage": "postgresql+psycopg2://u:secret@127.0.0.1:1/optuna"}, "cannot open the study"),
    ({"storage": "sqlite:////nonexistent-dir/x/optuna.db"}, "cannot open the study storage"),
]


def test_bad_input_is_one_line_before_any_trial(tmp_path):
    repo = tune_project(tmp_path / "repo", ran=False)
    for change, message in BAD_SPACES:
        (repo / "tune.yaml").write_text(yaml.safe_dump({**TINY_STUDY, **change}))
        proc = tune(repo, timeout=120)
        assert proc.returncode == 2, (change, proc.stdout, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (change, proc.stderr)
        assert "secret" not in proc.stderr and "trial 0" not in proc.stdout
        assert not (repo / "mlruns").exists()  # nothing logged, no run started
        assert not (repo / "tuning" / "tiny").exists()  # no trial
    (repo / "tune.yaml").write_text(yaml.safe_dump(TINY_STUDY))
    proc = tune(repo, timeout=120)  # a good search, but no pipeline run to start from
    assert proc.returncode == 2 and "run `dvc repro` once before tuning" in proc.stderr
    (repo / "tune.yaml").write_text("study: [unclosed")
    assert "tune.yaml is not valid YAML" in tune(repo, timeout=120).stderr
    proc = sh(tmp_path, "vaepipe", "tune", check=False, timeout=120)  # not in a project
    assert proc.returncode == 2 and "cd into it" in proc.stderr
