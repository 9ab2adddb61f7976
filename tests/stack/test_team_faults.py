"""Faults of the team stack, with the real servers (scripts/team.py): the tracking server stopped
mid-training, PostgreSQL restarted under a two-worker sweep, the object store down during
export, wrong credentials. Each stage failure is one `error:` line naming what failed, no
training is lost, no run is left RUNNING, and a rerun finishes."""

import json
import re
import signal
import subprocess
import time

from helpers import clean_env, make_project, sh
from teamstack import (
    mlflow_client,
    procs,
    queue_logs,
    queue_states,
    queue_workers,
    run_team,
    start_queue,
    stop_workers,
    team,
    team_project,
    wait_for,
    wait_queue,
)

from vaepipe.tracking import store


def stop_part(stack, part: str) -> None:
    """`team.py down PART`, in this process: no interpreter start between the moment the test
    picks and the stop (a tiny model trains an epoch in a tenth of a second)."""
    team.down(stack["dir"], [part])
    assert part not in team.load_state(stack["dir"]).get("procs", {})


def start_again(stack) -> None:
    """`up` starts what is not running, on the same ports."""
    r = run_team(stack["dir"], "up", timeout=300)
    assert r.returncode == 0, r.stderr
    assert team.load_state(stack["dir"])["ports"] == stack["state"]["ports"]


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def the_one_error(proc) -> str:
    """The failed stage's single `error:` line; no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    lines = error_lines(out)
    assert len(lines) == 1, out
    assert "Traceback" not in out, out
    print(f"\n{lines[0]}")
    return lines[0]


def run_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if len(runs) == 1 else None


def test_tracking_server_stopped_mid_training_loses_no_training(stack, tmp_path):
    epochs = 100  # minutes of headroom: the server stops at epoch 3 or so
    repo = make_project(
        tmp_path / "repo",
        **{
            "train.epochs": epochs,
            "train.image_every": 50,
            "mlflow.experiment": "fault-server",
        },
    )
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"])
    client = mlflow_client(stack)
    proc = subprocess.Popen(
        ["dvc", "repro", "train"], cwd=repo, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def some_epochs_logged():
            run = run_of(client, "fault-server")
            if run and len(client.get_metric_history(run.info.run_id, "loss/train")) >= 3:
                return run
            return None

        run = wait_for("3 epochs in MLflow", some_epochs_logged, 120, every=0.2)
        stop_part(stack, "mlflow")
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=180)
        failed_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        start_again(stack)
    line = the_one_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert f"MLflow store {stack['uri']} is unreachable while logging" in line
    saved = int(re.search(r"saved up to epoch (\d+) in models/checkpoints/last.pt", line)[1])
    assert 3 <= saved < epochs and run.info.run_id in line
    print(f"the stage failed {failed_after:.0f} s after the server stopped, at epoch {saved}")

    # The server is back: the run is still open (nobody could close it), and dvc repro
    # continues the training from the checkpoint into that same run.
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    again = sh(repo, "dvc", "repro", "train", env=env)
    assert f"resuming from models/checkpoints/last.pt (epoch {saved}, batch 0)" in again.stdout
    assert json.loads((repo / "metrics/train.json").read_text())["run_id"] == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
    assert sorted(steps) == list(range(1, epochs + 1))  # every epoch once, none missing
    assert run_of(client, "fault-server").info.run_id == run.info.run_id  # and no other run


def test_postgres_restarted_under_a_two_worker_sweep_loses_no_run(stack, tmp_path):
    """No run lost, meaning: every queued experiment ends with exactly one FINISHED run holding
    every epoch and none is left RUNNING. A restart of a few seconds under the first two
    experiments is absorbed by the retries; an outage longer than them under the next two fails
    those stages, their runs end FAILED once the database is back, and queued again they finish.
    """
    epochs, seeds = 60, (11, 12, 13, 14)
    repo = make_project(
        tmp_path / "repo",
        **{
            "train.epochs": epochs,
            "train.image_every": 0,  # no pictures: the database is what this is about
            "mlflow.experiment": "fault-postgres",
        },
    )
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"])
    client = mlflow_client(stack)
    for seed in seeds:  # train only: that is where a run logs all the time
        sh(repo, "dvc", "exp", "run", "--queue", "-n", f"pg{seed}", "-S", f"train.seed={seed}",
           "train")  # fmt: skip

    def training(names):
        def check():
            exp = client.get_experiment_by_name("fault-postgres")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            running = [
                r for r in runs
                if r.info.status == "RUNNING" and r.data.tags.get("dvc_exp_name") in names
            ]  # fmt: skip
            return any(client.get_metric_history(r.info.run_id, "loss/train") for r in running)

        try:
            wait_for(f"{names} logging epochs", check, 240, every=0.3)
        except AssertionError as e:
            states = queue_states(repo, env)
            raise AssertionError(f"{e}; {states}\n{queue_logs(repo, states, env)}") from None

    def postgres_away(seconds: float) -> None:
        t0 = time.monotonic()
        stop_part(stack, "postgres")
        time.sleep(seconds)
        start_again(stack)
        print(f"\nPostgreSQL away for {time.monotonic() - t0:.1f} s under 2 workers")

    with queue_workers(repo):
        start_queue(repo, env, 2)
        training({"pg11", "pg12"})
        postgres_away(5)  # a restart: within the retries
        training({"pg13", "pg14"})
        postgres_away(store.RETRY_SECONDS + 7)  # longer than the retries
        # Two machines' worth of work on a CI machine that also runs the other tiers: generous
        states = wait_queue(repo, env, 600)
        print(f"experiments: {states}")
        failed = [n for n, s in states.items() if s != "Success"]
        stop_workers(repo)  # none of the drained queue's workers may take the ones queued next
        exp_id = client.get_experiment_by_name("fault-postgres").experiment_id
        for name in failed:
            runs = client.search_runs([exp_id], f"tags.dvc_exp_name = '{name}'")
            assert {r.info.status for r in runs} <= {"FAILED"}, (name, runs)
            assert all("unreachable" in r.data.tags.get("error", "") or "failed while"
                       in r.data.tags.get("error", "") for r in runs), runs  # fmt: skip
            sh(repo, "dvc", "exp", "run", "--queue", "-n", f"{name}-again", "-S",
               f"train.seed={name.removeprefix('pg')}", "train")  # fmt: skip
        if failed:
            start_queue(repo, env, 2)
            again = wait_queue(repo, env, 600)
            assert all(again[f"{n}-again"] == "Success" for n in failed), again

    runs = client.search_runs([exp_id], max_results=1000)
    print("runs:", sorted((r.data.tags.get("dvc_exp_name"), r.info.status) for r in runs))
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == len(seeds)  # one per experiment: none lost, none twice
    assert sorted(r.data.params["train.seed"] for r in finished) == [str(s) for s in seeds]
    for r in finished:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss/train")]
        assert sorted(steps) == list(range(1, epochs + 1)), r.data.tags.get("dvc_exp_name")
    assert set(failed) <= {"pg13", "pg14"}  # the restart itself failed nothing


def test_object_store_down_during_export(stack, tmp_path):
    repo = make_project(tmp_path / "repo", **{"mlflow.experiment": "fault-s3"})
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"])
    sh(repo, "dvc", "repro", "evaluate", env=env)
    stop_part(stack, "s3")
    try:
        t0 = time.monotonic()
        failed = sh(repo, "dvc", "repro", env=env, check=False)
        failed_s = time.monotonic() - t0
        onnx = {p.name: p.read_bytes() for p in (repo / "models").glob("*.onnx")}
    finally:
        start_again(stack)
    line = the_one_error(failed)
    endpoint = f"{stack['uri']}/api/2.0/mlflow-artifacts"
    assert f"MLflow store {stack['uri']} failed while logging model" in line
    assert f"{endpoint} (uploading " in line and "object store" in line
    print(f"export failed after {failed_s:.0f} s")
    # The ONNX files on disk are whole: they load and run, as written before the upload.
    import numpy as np
    import onnxruntime as ort

    assert {"encoder.onnx", "decoder.onnx"} <= set(onnx)
    sess = ort.InferenceSession(onnx["decoder.onnx"], providers=["CPUExecutionProvider"])
    assert sess.run(None, {"z": np.zeros((1, 4), np.float32)})[0].shape == (1, 1, 8, 8)

    again = sh(repo, "dvc", "repro", env=env)
    assert "Running stage 'export'" in again.stdout and "registered" in again.stdout
    run_id = json.loads((repo / "metrics/train.json").read_text())["run_id"]
    client = mlflow_client(stack)
    assert client.get_run(run_id).info.status == "FINISHED"
    versions = client.search_model_versions("name = 'vae-decoder'")
    assert [v.run_id for v in versions].count(run_id) == 1  # registered once, by the rerun


def test_wrong_credentials_are_one_line_without_the_secret(stack, tmp_path):
    """The server's object-store secret rotated under it, and a DVC client's secret wrong."""
    wrong = "wrong-" + "5ec7e7" * 6
    secrets = [wrong, *stack["creds"].values()]
    repo = team_project(tmp_path / "repo", stack, **{"mlflow.experiment": "fault-creds"})
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"])

    # mlflow server restarted with a wrong S3 secret: the stage's first upload is refused.
    state = team.load_state(stack["dir"])
    stop_part(stack, "mlflow")
    creds = stack["creds"]
    server, entry = team.servers.start_mlflow(
        stack["dir"], state["ports"], creds["VAEPIPE_TEAM_S3_KEY"], wrong,
        creds["VAEPIPE_TEAM_PG_PASSWORD"], 1,
    )  # fmt: skip
    try:
        ports = state["ports"]
        log = stack["dir"] / "logs" / "mlflow.log"
        team.wait_until("mlflow", lambda: team.servers.mlflow_ready(ports), 180, server, log)
        failed = sh(repo, "dvc", "repro", "train", env=env, check=False)
    finally:
        procs.stop(entry, signal.SIGTERM, 30, group=True)
        server.wait(timeout=30)
        start_again(stack)
    line = the_one_error(failed)
    assert f"{stack['uri']}/api/2.0/mlflow-artifacts (uploading " in line
    for secret in secrets:
        assert secret not in failed.stdout + failed.stderr

    # A DVC client with a wrong secret: refused, nothing printed twice, no secret shown.
    sh(repo, "dvc", "remote", "modify", "--local", "team", "secret_access_key", wrong)
    push = sh(repo, "dvc", "push", env=env, check=False)
    out = push.stdout + push.stderr
    assert push.returncode != 0
    assert len([ln for ln in out.splitlines() if ln.startswith("ERROR")]) == 1, out
    print("dvc push:", [ln for ln in out.splitlines() if ln.startswith("ERROR")][0])
    for secret in secrets:
        assert secret not in out
