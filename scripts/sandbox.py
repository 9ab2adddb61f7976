"""Sandboxes for the tests and benchmarks that run the real thing: a copy of the project as a
fresh git repo (its own dvc.lock and MLflow store, so the real project is never touched), and a
registered model served by `mlflow models serve` on 127.0.0.1, stopped by its process group.
Standard library and PyYAML only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "src")
FILES = (
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
    ".dvc/plots.html",
)
# an identity of its own: a fresh machine (CI, a GPU box) may have none configured
GIT_IDENTITY = ("-c", "user.name=vaepipe", "-c", "user.email=vaepipe@localhost")


def set_params(repo: Path, overrides: dict) -> None:
    """Lay {"section.key": value} over repo's params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(dest: Path, overrides: dict | None = None, message: str = "sandbox") -> Path:
    """The pipeline (stage scripts, library, dvc.yaml, params.yaml with `overrides`) in `dest`
    as a fresh git repo with one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FOLDERS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dest / name)
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    set_params(dest, overrides or {})
    for args in (["init", "-q"], ["add", "-A"], [*GIT_IDENTITY, "commit", "-qm", message]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_uri: str, env: dict, log: Path, timeout: float = 90) -> Iterator[str]:
    """`mlflow models serve -m model_uri` (env: its environment, MLFLOW_TRACKING_URI included)
    on 127.0.0.1 at a free port, up within `timeout` s; yields its /invocations URL. Stopped by
    process group at the end: uvicorn survives its parent."""
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "-h", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/ping", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow models serve {model_uri} did not come up:\n{log.read_text()}"
                    ) from None
                time.sleep(0.5)
        yield url + "/invocations"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
