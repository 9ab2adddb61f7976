"""`vaepipe tune` on the team stack: two workers (two clones) on one study in its PostgreSQL,
logging to its MLflow server, one of them killed outright in the middle of a trial; the
storage line `team-up` prints; a wrong password refused in one line."""

import os
import shutil
import signal
import subprocess
import time

from helpers import TINY_STUDY, clean_env, sh, trial_states, tune_project
from teamstack import mlflow_client, usage_lines

STUDY = {**TINY_STUDY, "study": "team", "trials": 3}
WORKER_TIMEOUT = 900


def storage_url(stack, password=None) -> str:
    password = password or stack["creds"]["VAEPIPE_TEAM_PG_PASSWORD"]
    port = stack["state"]["ports"]["postgres"]
    return f"postgresql+psycopg2://mlflow:{password}@127.0.0.1:{port}/optuna"


def test_team_up_prints_the_study_storage_without_its_password(stack):
    line = next(ln for ln in usage_lines(stack["up"]) if "VAEPIPE_TUNE_STORAGE" in ln)
    assert stack["creds"]["VAEPIPE_TEAM_PG_PASSWORD"] not in stack["up"]
    got = sh(stack["dir"], "bash", "-ec", f'{line}\necho "$VAEPIPE_TUNE_STORAGE"').stdout
    assert got.strip() == storage_url(stack)


def worker(repo, env, *args) -> subprocess.Popen:
    return subprocess.Popen(
        ["vaepipe", "tune", *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def training_log(repo):
    for log in sorted((repo / "tuning" / "team").glob("trial-*.log")):
        if "epoch" in log.read_text(errors="replace"):
            return log
    return None


def test_two_workers_share_a_study_and_one_killed_mid_trial_is_resumed(stack, tmp_path):
    url = storage_url(stack)
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"], VAEPIPE_TUNE_STORAGE=url)
    a = tune_project(tmp_path / "a", STUDY, env=env)
    # the second machine's clone, as `git clone` and `dvc pull` would leave it
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=True)
    wa, wb = worker(a, env), worker(b, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and training_log(b) is None and wb.poll() is None:
        time.sleep(0.5)
    assert training_log(b), "worker b never started training"
    os.kill(wb.pid, signal.SIGKILL)  # the worker alone: its dvc hears of it from the kernel
    wb.wait(30)
    out_a, _ = wa.communicate(timeout=WORKER_TIMEOUT)
    assert wa.returncode == 0, out_a
    # b again: it continues the same study, each trial once
    wb = worker(b, env, "--trials", "4")
    out_b, _ = wb.communicate(timeout=WORKER_TIMEOUT)
    assert wb.returncode == 0, out_b
    states = trial_states(url, "team")
    numbers = [n for n, _ in states]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1, states
    counts = {s: sum(1 for _, x in states if x == s) for _, s in states}
    assert counts.get("RUNNING", 0) == 0 and counts.get("FAIL") == 1, states
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 4, states
    # every trial's MLflow run on the team server ended, none RUNNING
    client = mlflow_client(stack)
    exp = client.get_experiment_by_name("vaepipe")
    runs = client.search_runs([exp.experiment_id], "tags.`vaepipe.study` = 'team'")
    trials = [r for r in runs if "vaepipe.trial" in r.data.tags]
    assert trials and all(r.info.status != "RUNNING" for r in trials)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in trials}
    assert len(parents) == 1  # both workers nest their trials under the one study run


def test_a_wrong_password_is_one_line_without_the_password(stack, tmp_path):
    repo = tune_project(tmp_path / "repo", STUDY, ran=False)
    proc = sh(repo, "vaepipe", "tune", "--storage", storage_url(stack, "wrong-pw-1"), check=False)
    assert proc.returncode == 2 and "password authentication failed" in proc.stderr
    assert "wrong-pw-1" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
