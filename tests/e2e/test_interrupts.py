"""A pipeline treated as a hostile user would: signals to `dvc repro` and to the stages at
several points, a parity gate that rejects, a copied project. After each: no stage process
left behind, no MLflow run RUNNING, every output of a stage old or new together (never a mix),
no temp file inside an output, and `dvc repro` again brings `dvc status` back to clean."""

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import clean_env, set_params, sh

# long enough to interrupt training in the middle, short enough for the suite
PARAMS = {"train.epochs": 30, "train.batch_size": 16, "train.threads": 1}
STAGE_OUTPUTS = {
    "prepare": ["data/prepared"],
    "classifier": ["models/classifier.pt", "metrics/classifier.json"],
    "train": ["models/vae.pt", "metrics/train.json", "plots/train/curves.json"],
    "evaluate": ["metrics/evaluate.json", "plots/evaluate"],
    "export": [f"models/{n}.onnx" for n in ("encoder", "decoder", "scorer", "prior")]
    + ["models/decoder.fp16.onnx", "models/encoder.int8.onnx", "metrics/export.json"],
}


@pytest.fixture(scope="module")
def repo(new_project):
    repo = new_project("interrupts", **PARAMS)
    sh(repo, "dvc", "repro", timeout=900)
    return repo


def fingerprint(repo: Path, stage: str) -> dict[str, str]:
    """sha256 of each output file of `stage` (every file of an output folder)."""
    out = {}
    for rel in STAGE_OUTPUTS[stage]:
        path = repo / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def runs(repo: Path) -> dict[str, str]:
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        return dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())


def stage_pids(stage: str, repo: Path) -> list[int]:
    """Python processes running pipeline/<stage>.py in `repo` (not the `sh -c` around one)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if f"pipeline/{stage}.py" in argv and cwd == str(repo):
                found.append(int(d.name))
    return found


def start_repro(repo: Path, *args: str, shell: str = "/bin/bash") -> subprocess.Popen:
    """`dvc repro`, whose stages run through `shell -c` (DVC uses $SHELL): bash replaces
    itself with the stage; dash, /bin/sh on Debian, stays between DVC and the stage."""
    return subprocess.Popen(
        ["dvc", "repro", *args], cwd=repo, env=clean_env(SHELL=shell), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def wait_until(what: str, check, timeout: float = 300, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")


def temp_files(repo: Path) -> list[str]:
    """Temp files inside any output folder or beside an output file."""
    places = {repo / "models", repo / "metrics", repo / "plots", repo / "data" / "prepared"}
    return [
        str(p.relative_to(repo))
        for place in places
        if place.is_dir()
        for p in place.rglob("*")
        if p.name.endswith(".tmp") or ".tmp-" in p.name
    ]


def assert_old_and_whole(repo: Path, stage: str, before: dict[str, str]) -> None:
    """The interrupted stage published nothing: its outputs are the old ones, every one."""
    assert fingerprint(repo, stage) == before, stage
    assert not temp_files(repo), temp_files(repo)


def rerun_is_clean(repo: Path) -> None:
    sh(repo, "dvc", "repro", timeout=900)
    status = sh(repo, "dvc", "status").stdout
    assert "up to date" in status, status
    assert "RUNNING" not in runs(repo).values(), runs(repo)
    assert not (repo / ".vaepipe-staging").exists()


# (stage, signal, whom, shell): each stage interrupted mid-way by a different signal and
# sender; SIGTERM to dvc, which exits at once, under both shells: the stage must stop with it
CASES = [
    ("prepare", signal.SIGTERM, "stage", "/bin/bash"),
    ("prepare", signal.SIGKILL, "stage", "/bin/sh"),
    ("classifier", signal.SIGINT, "stage", "/bin/sh"),
    ("classifier", signal.SIGTERM, "dvc", "/bin/sh"),
    ("train", signal.SIGTERM, "dvc", "/bin/bash"),
    ("train", signal.SIGINT, "stage", "/bin/bash"),
    ("evaluate", signal.SIGINT, "stage", "/bin/sh"),
    ("evaluate", signal.SIGKILL, "stage", "/bin/bash"),
    ("export", signal.SIGTERM, "stage", "/bin/bash"),
    ("export", signal.SIGTERM, "dvc", "/bin/sh"),
    ("export", signal.SIGKILL, "dvc", "/bin/bash"),
]
# mid-way: train once its MLflow run is open (it trains for a while after), the others after a
# pause that ends before they publish even on an idle machine (a busy one is slower)
PAUSE = {"prepare": 0.5, "classifier": 2.5, "train": 1.0, "evaluate": 1.5, "export": 3.0}


def case_id(value) -> str:
    return getattr(value, "name", None) or str(value).rsplit("/", 1)[-1]


@pytest.mark.parametrize(("stage", "sig", "whom", "shell"), CASES, ids=case_id)
def test_an_interrupted_stage_leaves_old_outputs_whole_and_repro_recovers(
    repo, stage, sig, whom, shell
):
    before = fingerprint(repo, stage)
    # another seed: every output of the stage would change if it finished
    key = {
        "prepare": "data.seed",
        "classifier": "classifier.seed",
        "train": "train.seed",
        "evaluate": "evaluate.seed",
        "export": "export.scorer_seed",
    }
    set_params(repo, **{key[stage]: 7})
    try:
        proc = start_repro(repo, shell=shell)
        pid = wait_until(f"{stage} running", lambda: (stage_pids(stage, repo) or [None])[0])
        if stage == "train":
            wait_until("its run open", lambda: "RUNNING" in runs(repo).values())
        time.sleep(PAUSE[stage])
        os.kill(proc.pid if whom == "dvc" else pid, sig)
        if whom == "dvc" and sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # what a closed terminal does to its group
        proc.wait(timeout=300)
        wait_until(f"{stage} stopped", lambda: not stage_pids(stage, repo), timeout=180)
        if sig != signal.SIGKILL:  # a stage killed outright cannot close its run
            wait_until("no run RUNNING", lambda: "RUNNING" not in runs(repo).values(), 180)
        assert_old_and_whole(repo, stage, before)
    finally:
        set_params(repo, **{key[stage]: 0})
    rerun_is_clean(repo)  # the rerun reopens and closes a run a SIGKILL left RUNNING


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
    rerun_is_clean(repo)


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
    rerun_is_clean(repo)
