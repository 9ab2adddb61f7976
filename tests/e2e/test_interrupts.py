"""A pipeline treated as a hostile user would: signals to `dvc repro` and to the stages at
several points, a parity gate that rejects, a copied project. After each: no stage process
left behind, no MLflow run RUNNING, every output of a stage old or new together (never a mix),
no temp file inside an output, and `dvc repro` again brings `dvc status` back to clean."""

import json
import shutil
import signal
import sqlite3

import pytest
from helpers import set_params, sh
from interrupts import PARAMS, assert_clean, fingerprint, run_case, runs, temp_files


@pytest.fixture(scope="module")
def repo(new_project):
    repo = new_project("interrupts", **PARAMS)
    sh(repo, "dvc", "repro", timeout=900)
    return repo


# (stage, signal, whom, shell): each stage interrupted mid-way by a different signal and
# sender; SIGTERM to dvc, which exits at once, under both shells: the stage must stop with it.
# A SIGTERM or SIGINT closes the run: the seed goes back and nothing reruns. After a SIGKILL
# the user runs `dvc repro` again, which resumes and closes the run left RUNNING: the SIGKILLs
# go to the stages whose rerun is short (a new data draw would rerun every stage).
# (`python scripts/interrupts.py` runs every signal at three points of every stage.)
CASES = [
    ("prepare", signal.SIGTERM, "stage", "/bin/bash"),
    ("prepare", signal.SIGINT, "stage", "/bin/sh"),
    ("classifier", signal.SIGKILL, "stage", "/bin/sh"),
    ("classifier", signal.SIGTERM, "dvc", "/bin/sh"),
    ("train", signal.SIGTERM, "dvc", "/bin/bash"),
    ("train", signal.SIGINT, "stage", "/bin/bash"),
    ("train", signal.SIGKILL, "stage", "/bin/sh"),
    ("evaluate", signal.SIGINT, "stage", "/bin/sh"),
    ("evaluate", signal.SIGKILL, "stage", "/bin/bash"),
    ("export", signal.SIGTERM, "stage", "/bin/bash"),
    ("export", signal.SIGTERM, "dvc", "/bin/sh"),
    ("export", signal.SIGKILL, "dvc", "/bin/bash"),
]


def case_id(value) -> str:
    return getattr(value, "name", None) or str(value).rsplit("/", 1)[-1]


@pytest.mark.parametrize(("stage", "sig", "whom", "shell"), CASES, ids=case_id)
def test_an_interrupted_stage_leaves_old_outputs_whole_and_repro_recovers(
    repo, stage, sig, whom, shell
):
    retry = sig == signal.SIGKILL
    outcome = run_case(repo, stage, sig, whom, "middle", shell, retry=retry)
    assert outcome.startswith("old outputs kept"), outcome


def test_a_graph_that_fails_the_parity_gate_replaces_nothing_and_fails_the_run(repo):
    before = fingerprint(repo, "export")
    run_id = json.loads((repo / "metrics/train.json").read_text())["run_id"]
    set_params(repo, **{"export.parity_atol": 1e-12})
    try:
        proc = sh(repo, "dvc", "repro", check=False, timeout=900)
        assert proc.returncode != 0
        assert "ONNX parity failed" in proc.stdout + proc.stderr
        assert fingerprint(repo, "export") == before  # the good graphs stay
        assert not temp_files(repo)
        assert runs(repo)[run_id] == "FAILED"
        with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
            (error,) = db.execute(
                "SELECT value FROM tags WHERE run_uuid=? AND key='error'", (run_id,)
            ).fetchone()
        assert error.startswith("export: ONNX parity failed")
    finally:
        set_params(repo, **{"export.parity_atol": 0.0001})
    assert "up to date" in sh(repo, "dvc", "status").stdout  # the lock still names the good ones
    sh(repo, "dvc", "repro", "-f", "-s", "export", timeout=600)  # exported again: it passes
    assert runs(repo)[run_id] == "FINISHED"
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid=?", (run_id,)))
    assert "error" not in tags
    assert_clean(repo)


def test_a_copied_project_refuses_to_log_into_the_original(repo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    artifacts = repo / "mlruns" / "artifacts"
    listing = sorted(str(p) for p in artifacts.rglob("*"))
    proc = sh(copy, "dvc", "repro", "-f", "-s", "evaluate", check=False, timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "was copied or moved from another project" in out and str(artifacts) in out
    assert "Traceback" not in out
    assert sorted(str(p) for p in artifacts.rglob("*")) == listing  # nothing written there


def test_a_diverging_run_speaks_only_of_its_own_checkpoint(repo):
    """models/checkpoints/last.pt is the earlier run's: a new run that diverges in its first
    epoch has none of its own, and says so (and publishes nothing)."""
    assert (repo / "models/checkpoints/last.pt").is_file()
    before = fingerprint(repo, "train")
    set_params(repo, **{"train.lr": 1e9})
    try:
        proc = sh(repo, "dvc", "repro", "train", check=False, timeout=600)
    finally:
        set_params(repo, **{"train.lr": 0.001})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no epoch of it finished, so it saved no checkpoint" in out
    assert "last good checkpoint" not in out
    assert fingerprint(repo, "train") == before
    assert_clean(repo)
