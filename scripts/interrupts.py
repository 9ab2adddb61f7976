"""The pipeline interrupted as a hostile user would: a signal to a stage or to `dvc repro` at a
chosen point of a stage, then the checks that nothing was lost or half-done. After each: no
stage process left behind, no MLflow run RUNNING, no registered version left incomplete, each
stage's outputs the old ones or the new ones whole (never a mix), no temp file inside an
output, and `dvc repro` again brings `dvc status` back to clean.

tests/e2e/test_interrupts.py runs a case per stage and signal; run as a script, this runs the
whole matrix (SIGINT, SIGTERM and SIGKILL at three points of each stage) in a sandbox copy of
the project and prints a line per case:

    python scripts/interrupts.py [--stages train,evaluate] [--signals SIGTERM] [--points late]

Standard library, PyYAML and the sandbox only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sandbox
import yaml

# long enough to interrupt training in the middle, short enough for the suite (digits)
PARAMS = {
    "data.dataset": "digits",
    "model.hidden": [32],
    "model.latent_dim": 4,
    "train.epochs": 30,
    "train.batch_size": 16,
    "train.threads": 1,
    "evaluate.iwae_k": 8,
}
STAGES = ("prepare", "classifier", "train", "evaluate", "export")
STAGE_OUTPUTS = {
    "prepare": ["data/prepared"],
    "classifier": ["models/classifier.pt", "metrics/classifier.json"],
    "train": ["models/vae.pt", "metrics/train.json", "plots/train/curves.json"],
    "evaluate": ["metrics/evaluate.json", "metrics/summary.json", "plots/evaluate"],
    "export": [f"models/{n}.onnx" for n in ("encoder", "decoder", "scorer", "prior")]
    + ["models/decoder.fp16.onnx", "models/encoder.int8.onnx", "metrics/export.json"],
}
# another value of it changes every output of the stage
SEED = {
    "prepare": "data.seed",
    "classifier": "classifier.seed",
    "train": "train.seed",
    "evaluate": "evaluate.seed",
    "export": "export.scorer_seed",
}
# "middle": train once its MLflow run is open (it trains for a while after), the others after
# a pause that ends before they publish even on an idle machine (a busy one is slower), with
# the half second a stage takes to see that dvc is gone (signals.stop_with_parent) to spare:
# the classifier publishes about 2.8 s after it starts on an idle machine, export 1.5 s
PAUSE = {"prepare": 0.5, "classifier": 1.5, "train": 1.0, "evaluate": 1.5, "export": 0.5}
POINTS = ("start", "middle", "late")  # late: the stage is writing its outputs to staging
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def env(**extra: str) -> dict[str, str]:
    """This Python's environment without MLflow/DVC settings, its bin first on PATH."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}"
    return {**out, **extra}


def dvc(repo: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["dvc", *args], cwd=repo, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


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


def incomplete_versions(repo: Path) -> list[str]:
    """Registered versions whose registration did not finish (tag complete=false)."""
    with sqlite3.connect(repo / "mlruns" / "mlflow.db") as db:
        rows = db.execute(
            "SELECT name, version FROM model_version_tags WHERE key='complete' AND value!='true'"
        ).fetchall()
    return [f"{name} v{version}" for name, version in rows]


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
        ["dvc", "repro", *args], cwd=repo, env=env(SHELL=shell), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def wait_until(what: str, check: Callable, timeout: float = 300, every: float = 0.05):
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


def staging(repo: Path, pid: int) -> bool:
    """Whether the stage `pid` has written a file to its staging folder."""
    return any(f.is_file() for f in (repo / ".vaepipe-staging").glob(f"stage-*-{pid}/out/**/*"))


def wait_for_point(repo: Path, stage: str, pid: int, point: str) -> bool:
    """Until `point` of the running stage; False when the stage ended before it."""
    if point == "middle":
        if stage == "train":
            wait_until("its run open", lambda: "RUNNING" in runs(repo).values())
        time.sleep(PAUSE[stage])
    elif point == "late":
        return bool(
            wait_until(
                f"{stage} writing its outputs",
                lambda: "yes" if staging(repo, pid) else "ended" if not stage_pids(stage, repo)
                else None,
                every=0.01,
            ) == "yes"
        )  # fmt: skip
    return True


def interrupt(repo: Path, stage: str, sig: signal.Signals, whom: str, point: str = "middle",
              shell: str = "/bin/bash") -> tuple[float, str]:  # fmt: skip
    """Run `dvc repro` and send `sig` to the stage (or to dvc) at `point` of `stage`; wait for
    the stage to stop and, unless killed outright, for its run to close. Seconds it took from
    the signal until then, and what `dvc repro` printed."""
    proc = start_repro(repo, shell=shell)
    try:

        def started():
            if proc.poll() is not None:  # dvc ended before the stage began: say why
                raise AssertionError(f"dvc repro ended first:\n{proc.stdout.read()}")
            return (stage_pids(stage, repo) or [None])[0]

        pid = wait_until(f"{stage} running", started)
        wait_for_point(repo, stage, pid, point)
        sent = time.monotonic()
        target = proc.pid if whom == "dvc" else pid
        try:
            os.kill(target, sig)
            if whom == "dvc" and sig == signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGKILL)  # what a closed terminal does to its group
        except ProcessLookupError:
            pass  # it ended first: its outputs must then be the new ones, whole
        printed, _ = proc.communicate(timeout=300)
        wait_until(f"{stage} stopped", lambda: not stage_pids(stage, repo), timeout=180)
        if sig != signal.SIGKILL:  # a stage killed outright cannot close its run
            wait_until("no run RUNNING", lambda: "RUNNING" not in runs(repo).values(), 180)
        return time.monotonic() - sent, printed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def assert_clean(repo: Path) -> None:
    """`dvc repro` again: the pipeline complete, every run closed, every version complete."""
    dvc(repo, "repro")
    status = dvc(repo, "status").stdout
    assert "up to date" in status, status
    assert "RUNNING" not in runs(repo).values(), runs(repo)
    assert not incomplete_versions(repo), incomplete_versions(repo)
    assert not (repo / ".vaepipe-staging").exists()
    assert not temp_files(repo), temp_files(repo)


def seed(repo: Path, stage: str) -> int:
    section, key = SEED[stage].split(".")
    return yaml.safe_load((repo / "params.yaml").read_text())[section][key]


def run_case(repo: Path, stage: str, sig: signal.Signals, whom: str, point: str = "middle",
             shell: str = "/bin/bash", retry: bool = True) -> str:  # fmt: skip
    """One case: `stage` interrupted while it runs with another seed, so that each of its
    outputs would change. Then `dvc repro` again: with that seed (retry, as a user would; it
    also closes a run SIGKILL left RUNNING) the stage's outputs were the old ones or the new
    ones whole; with the seed put back (no retry) they must be the old ones. What happened."""
    before, old_seed = fingerprint(repo, stage), seed(repo, stage)
    sandbox.set_params(repo, {SEED[stage]: old_seed + 1})
    try:
        took, printed = interrupt(repo, stage, sig, whom, point, shell)
        interrupted = fingerprint(repo, stage)
        assert not temp_files(repo), temp_files(repo)
    finally:
        if not retry:
            sandbox.set_params(repo, {SEED[stage]: old_seed})
    assert_clean(repo)
    now = fingerprint(repo, stage)
    if interrupted not in (before, now if retry else before):
        changed = sorted(f for f in interrupted if interrupted[f] != before.get(f))
        raise AssertionError(
            f"{stage}: old and new outputs: {changed} changed, {len(before) - len(changed)} "
            f"kept; the signal was sent {took:.1f} s before the stage stopped; dvc repro "
            f"printed:\n{printed[-3000:]}"
        )
    outcome = "old outputs kept" if interrupted == before else "it finished first: new outputs"
    return f"{outcome}; stopped {took:.1f} s after the signal"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--signals", default=",".join(s.name for s in SIGNALS))
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--to", choices=("stage", "dvc"), default="stage", help="whom to signal")
    ap.add_argument("--shell", default="/bin/sh", help="DVC's $SHELL (dash stays between)")
    args = ap.parse_args()
    cases = [
        (stage, signal.Signals[name], point)
        for stage in args.stages.split(",")
        for name in args.signals.split(",")
        for point in args.points.split(",")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        repo = sandbox.copy_project(Path(tmp) / "project", PARAMS)
        started = time.monotonic()
        dvc(repo, "repro")
        print(f"reference run: {time.monotonic() - started:.0f} s", flush=True)
        failed = 0
        for stage, sig, point in cases:
            started = time.monotonic()
            try:
                outcome = run_case(repo, stage, sig, args.to, point, args.shell)
                mark = "ok  "
            except AssertionError as e:
                failed += 1
                outcome, mark = str(e).splitlines()[0], "FAIL"
            took = time.monotonic() - started
            print(f"{mark} {stage:<10} {sig.name:<7} {point:<6} {took:5.0f} s  {outcome}",
                  flush=True)  # fmt: skip
    print(f"{len(cases) - failed} of {len(cases)} cases held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
