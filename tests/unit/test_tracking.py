"""Store resolution and a damaged store (real sqlite files, no server)."""

import pytest

from vaepipe import tracking
from vaepipe.tracking import store


def test_store_follows_dvc_root_then_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "real-root"))
    assert (
        tracking.tracking_uri() == f"sqlite:///{tmp_path / 'real-root' / 'mlruns' / 'mlflow.db'}"
    )
    uri = tracking.tracking_uri()
    assert store.artifact_location(uri) == (tmp_path / "real-root/mlruns/artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert store.artifact_location("http://127.0.0.1:5000") is None


def test_damaged_store_is_a_clear_error_and_left_as_it_was(tmp_path, monkeypatch):
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"not a database")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with pytest.raises(
        tracking.TrackingError, match="cannot be read as an MLflow database.*'vaepipe'"
    ):
        tracking.setup("vaepipe")
    assert db.read_bytes() == b"not a database"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_named_at_setup(monkeypatch):
    import time

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    with pytest.raises(tracking.TrackingError, match=f"MLflow tracking server {uri}"):
        tracking.setup("vaepipe")
    assert time.perf_counter() - start < 10


def test_every_call_retries_then_names_the_store_and_what_it_was_doing(monkeypatch):
    """A server that went away after setup: each logging call gives up within its bounded
    retries with one message, however MLflow wrapped the connection error."""
    import mlflow

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(store, "RETRY_DELAY", 0.01)
    attempts = []

    def list_experiments():
        attempts.append(1)
        return mlflow.MlflowClient(uri).search_experiments()

    with pytest.raises(tracking.TrackingError) as e:
        tracking.call(list_experiments, "reading experiments")
    assert str(e.value).startswith(f"MLflow store {uri} is unreachable while reading experiments")
    assert len(attempts) == store.RETRY_ATTEMPTS
    assert "\n" not in str(e.value)


def test_a_transient_error_is_retried_and_a_bug_is_not(monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(store, "RETRY_DELAY", 0.001)
    answers = iter([MlflowException("(sqlite3.OperationalError) database is locked")] * 2)

    def flaky():
        err = next(answers, None)
        if err is not None:
            raise err
        return "logged"

    assert tracking.call(flaky, "logging metrics") == "logged"
    with pytest.raises(ZeroDivisionError):  # our bug: a traceback, not a disguised store error
        tracking.call(lambda: 1 / 0, "logging metrics")


# A process that opens a run in the store given as argv[1], says so, and waits to be killed.
HOLDER = """
import os, sys, time
os.environ["MLFLOW_TRACKING_URI"] = sys.argv[1]
from vaepipe import tracking
with tracking.run("vaepipe") as active:
    print(active.info.run_id, flush=True)
    time.sleep(120)
"""


def test_a_run_whose_process_was_killed_outright_is_closed_by_the_next_one(tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    import mlflow

    from vaepipe.tracking import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def holder():
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, uri], stdout=subprocess.PIPE, text=True
        )
        return proc, proc.stdout.readline().strip()

    killed, killed_run = holder()
    living, living_run = holder()
    try:
        killed.send_signal(signal.SIGKILL)  # no handler runs: the run stays RUNNING
        killed.wait(timeout=30)
        client = mlflow.MlflowClient(uri)
        assert client.get_run(killed_run).info.status == "RUNNING"
        with tracking.run("vaepipe") as active:
            assert active.data.tags["vaepipe.pid"] == str(os.getpid())
        done = client.get_run(killed_run)
        assert done.info.status == "KILLED"
        assert f"pid {killed.pid}" in done.data.tags["error"]
        assert client.get_run(living_run).info.status == "RUNNING"  # its process is alive
        # Resumed (train reopens the run of its checkpoint): this process's pid is on it, and
        # once it ends well no reason for a closing is left, even one another stage wrote
        # after the reopen (the reopen here sees none)
        client.delete_tag(killed_run, "error")
        with tracking.run("vaepipe", run_id=killed_run):
            running = client.get_run(killed_run)
            assert running.info.status == "RUNNING"
            assert running.data.tags["vaepipe.pid"] == str(os.getpid())
            # another stage starting here looks for runs left open: not this one
            assert killed_run not in runs.close_abandoned(running.info.experiment_id)
            client.set_tag(killed_run, "error", "written by another stage meanwhile")
        done = client.get_run(killed_run)
        assert done.info.status == "FINISHED" and "error" not in done.data.tags
    finally:
        living.kill()
        living.wait(timeout=30)


def test_a_run_of_dvc_repro_is_named_by_branch_and_commit(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        ident = ("-c", "user.name=t", "-c", "user.email=t@t")
        return subprocess.run(["git", *ident, *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip

    monkeypatch.chdir(tmp_path)
    assert store.default_run_name() is None  # not a git checkout
    git("init", "-q", "-b", "main")
    (tmp_path / "dvc.lock").write_text("a")
    (tmp_path / "params.yaml").write_text("a")
    git("add", "-A")
    git("commit", "-qm", "x")
    short = git("rev-parse", "--short=7", "HEAD")
    (tmp_path / "dvc.lock").write_text("b")  # the pipeline's own bookkeeping: not an edit
    assert store.default_run_name() == f"main@{short}"
    (tmp_path / "params.yaml").write_text("b")
    assert store.default_run_name() == f"main@{short}+edits"
