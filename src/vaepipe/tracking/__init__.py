"""MLflow store resolution, run lifecycle and tags (DESIGN.md, "MLflow").

Store: MLFLOW_TRACKING_URI if set, else sqlite:///<root>/mlruns/mlflow.db with artifacts in
<root>/mlruns/artifacts, where <root> is DVC_ROOT (queued `dvc exp` runs execute in a temporary
copy that DVC deletes) or the project root. Our code never leaves a run RUNNING: an exception
marks it FAILED, Ctrl-C / SIGTERM marks it KILLED.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vaepipe.errors import VaepipeError

STORE_DIR = "mlruns"


class TrackingError(VaepipeError):
    pass


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = root or project_root()
    return f"sqlite:///{root / STORE_DIR / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside its database; a tracking server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def _retry(fn, what: str, attempts: int = 8, delay: float = 0.25):
    """Retry sqlite 'database is locked' and connection hiccups with a bounded backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MLflow wraps sqlite/HTTP errors in several types
            msg = str(e)
            transient = "database is locked" in msg or "Max retries" in msg or "Connection" in msg
            if not transient or i == attempts - 1:
                raise
            time.sleep(delay * 2**i)


def _check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: "
            f"{getattr(e, 'reason', e)}"
        ) from None


def setup_uri() -> str:
    """Resolve the store, check it answers, and point MLflow at it; returns the URI."""
    import mlflow

    uri = tracking_uri()
    _check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def setup(experiment: str) -> str:
    """Point MLflow at the store and make sure `experiment` exists; returns its id."""
    import mlflow

    uri = setup_uri()

    def get_or_create() -> str:
        client = mlflow.MlflowClient()  # on a new sqlite store this creates the tables
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(
                experiment,
                artifact_location=artifact_location(uri),
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        except Exception as e:  # another worker created it first: that is success
            if "RESOURCE_ALREADY_EXISTS" in str(e) or "already exists" in str(e).lower():
                return mlflow.MlflowClient().get_experiment_by_name(experiment).experiment_id
            raise

    with _store_lock(uri):
        try:
            return _retry(get_or_create, f"experiment {experiment}")
        except Exception as e:  # a damaged or foreign database, a server that errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(
                f"cannot open MLflow experiment '{experiment}' in the store {uri}: {first[:300]}"
            ) from None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store/experiment creation between processes (parallel `dvc queue` workers):
    two MLflow clients creating a new sqlite store's tables at once corrupt the schema."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///")).parent / ".vaepipe-store.lock"
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_exists(experiment: str, run_id: str) -> bool:
    """Is `run_id` a run of the current store (a resumed checkpoint may outlive its store)?"""
    import mlflow

    setup(experiment)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a store that is gone
        return False
    return True


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(dataset: str, device: str) -> dict[str, str]:
    import torch

    tags = {"dataset": dataset, "device": device, "torch_version": torch.__version__}
    try:
        import onnxruntime

        tags["onnxruntime_version"] = onnxruntime.__version__
    except ImportError:
        pass
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if _git("status", "--porcelain", "--untracked-files=no"):
        tags["git_dirty"] = "true"
    for env, tag in (
        ("DVC_EXP_NAME", "dvc_exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    def handler(signum, frame):
        # SIGTERM (dvc queue kill, a scheduler) becomes Ctrl-C: checkpoint, close the run KILLED.
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def run(
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Start (or reopen, given run_id) an MLflow run; close it FINISHED/FAILED/KILLED."""
    import mlflow

    exp_id = setup(experiment)
    if run_id is None:
        run_name = run_name or os.environ.get("DVC_EXP_NAME") or None
        active = _retry(
            lambda: mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags),
            "start run",
        )
    else:
        active = _retry(lambda: mlflow.start_run(run_id=run_id), "reopen run")
        if tags:
            mlflow.set_tags(tags)
    status = "FAILED"
    try:
        with _sigterm_as_exception():
            yield active
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        # Why it failed, readable in `mlflow ui` beside the FAILED status.
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        raise
    finally:
        _retry(lambda: mlflow.end_run(status=status), "end run")


def log_epoch(stats_metrics: dict[str, float], step: int) -> None:
    import mlflow

    _retry(lambda: mlflow.log_metrics(stats_metrics, step=step), "log metrics")
