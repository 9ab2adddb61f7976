"""Kill `dvc repro` during training, run it again: the same MLflow run finishes, and the final
weights and every test metric equal those of an uninterrupted run (CPU, bit for bit)."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import PIPELINE, clean_env, sh

# The shared pipeline's params: its run is the uninterrupted reference.
PARAMS = PIPELINE
CHECKPOINT = "models/checkpoints/last.pt"
SHOWN = ("test/nll_iwae", "test/elbo", "test/recon", "test/kl", "test/mse", "test/probe_accuracy")


def runs(repo: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        return db.execute("SELECT run_uuid, status FROM runs").fetchall()


def epoch_counts(repo: Path, run_id: str) -> dict[str, int]:
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        rows = db.execute(
            "SELECT key, COUNT(*) FROM metrics WHERE run_uuid=? GROUP BY key", (run_id,)
        )
        return dict(rows.fetchall())


def metric(repo: Path, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric of a run."""
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        rows = db.execute(
            "SELECT step, value FROM metrics WHERE run_uuid=? AND key=?", (run_id, key)
        )
        return dict(rows.fetchall())


def digests(repo: Path, *paths: str) -> dict[str, str]:
    return {p: hashlib.sha256((repo / p).read_bytes()).hexdigest() for p in paths}


def weights(repo: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / "models/vae.pt", weights_only=True)["state_dict"]


def wait_for_epochs(repo: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until last.pt exists and has been rewritten once more (one more epoch finished)."""
    path, first, deadline = repo / CHECKPOINT, None, time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dvc repro ended ({proc.returncode}) before the interrupt")
        if path.is_file():
            mtime = path.stat().st_mtime_ns
            if first is None:
                first = mtime
            elif mtime != first:
                return
        time.sleep(0.02)
    raise AssertionError("no second checkpoint within the timeout")


@pytest.fixture
def reference(tiny_pipeline):
    """The uninterrupted run: the shared pipeline, with the same params."""
    repo, _ = tiny_pipeline
    return repo


def test_killed_repro_resumes_to_the_same_weights_and_metrics(tmp_path, reference, new_project):
    repo = new_project("killed", **PARAMS)
    log = open(tmp_path / "first.log", "w+")  # noqa: SIM115 - read back after the process ends
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: Ctrl-C reaches dvc and python alike
    )
    try:
        wait_for_epochs(repo, proc)
        time.sleep(0.05)  # most likely in the middle of an epoch now
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.seek(0)
    first = log.read()
    assert proc.returncode != 0, first
    assert "Traceback" not in first, first

    # Interrupted: the run is KILLED (not RUNNING), a checkpoint holds the position, no model.
    (run_id, status), *others = runs(repo)
    assert status == "KILLED" and not others
    state = torch.load(repo / CHECKPOINT, weights_only=True)
    assert 1 <= state["epoch"] < PARAMS["train.epochs"] and state["run_id"] == run_id
    assert not (repo / "models/vae.pt").exists()
    # The checkpoint carries the training seconds so far: at least its finished epochs' own.
    before = metric(repo, run_id, "epoch_seconds")
    assert state["train_seconds"] >= sum(before.values()) > 0
    prepared = digests(repo, *(f"data/prepared/{s}.npz" for s in ("train", "val", "test")))

    second = sh(repo, "dvc", "repro")
    out = second.stdout + second.stderr
    assert f"resuming from {CHECKPOINT} (epoch {state['epoch']}, batch {state['batch']})" in out
    assert "Traceback" not in out
    assert digests(repo, *prepared) == prepared  # the earlier stage's outputs were kept as is

    # One run in the store, the same one, now FINISHED, with every epoch logged exactly once.
    assert runs(repo) == [(run_id, "FINISHED")]
    counts = epoch_counts(repo, run_id)
    assert counts["elbo/train"] == counts["elbo/val"] == PARAMS["train.epochs"]
    # train_seconds is the whole training: the seconds carried, then the resumed epochs'.
    after = metric(repo, run_id, "epoch_seconds")
    resumed = sum(v for epoch, v in after.items() if epoch > state["epoch"])
    (train_seconds,) = metric(repo, run_id, "train_seconds").values()
    assert train_seconds >= state["train_seconds"] + resumed

    # Bit-for-bit the uninterrupted run: final weights, training and test figures.
    ref_w, got_w = weights(reference), weights(repo)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    skip = {"run_id", "train_seconds"}
    ref_train = json.loads((reference / "metrics/train.json").read_text())
    got_train = json.loads((repo / "metrics/train.json").read_text())
    assert {k: v for k, v in got_train.items() if k not in skip} == {
        k: v for k, v in ref_train.items() if k not in skip
    }
    ref_ev = json.loads((reference / "metrics/evaluate.json").read_text())
    got_ev = json.loads((repo / "metrics/evaluate.json").read_text())
    test_keys = sorted(k for k in ref_ev if k.startswith("test/"))
    assert set(SHOWN) <= set(test_keys)
    assert {k: got_ev[k] for k in test_keys} == {k: ref_ev[k] for k in test_keys}
    print(
        f"\nresumed from epoch {state['epoch']} batch {state['batch']}: "
        + ", ".join(f"{k} {got_ev[k]!r} (reference {ref_ev[k]!r})" for k in SHOWN)
    )
