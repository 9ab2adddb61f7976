"""MLflow: the store, the run lifecycle, and every logging call of the stages (DESIGN.md).

The stage scripts never import mlflow: each call goes through a function here (models and the
registry: vaepipe.tracking.registry), with one retry policy and one clear error.

Store: MLFLOW_TRACKING_URI if set, else sqlite:///<root>/mlruns/mlflow.db with artifacts in
<root>/mlruns/artifacts, where <root> is DVC_ROOT (queued `dvc exp` runs execute in a temporary
copy that DVC deletes) or the project root. Our code never leaves a run RUNNING: an exception
marks it FAILED, Ctrl-C / SIGTERM marks it KILLED.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from vaepipe import signals
from vaepipe.errors import VaepipeError

STORE_DIR = "mlruns"
# Our retry of transient store errors (sqlite "database is locked" between parallel workers, a
# dropped connection, a server whose database restarts): 6 attempts over about 8 s, and none
# begun after RETRY_SECONDS, as one attempt on an HTTP store holds MLflow's own retries (a
# server whose object store is down answers 500 only after ~4 s, 3 times: 20 s an attempt).
RETRY_ATTEMPTS = 6
RETRY_DELAY = 0.25
RETRY_SECONDS = 15
# Closing a run outlasts a short outage (a database restart) so that the run ends FAILED
# rather than RUNNING: more attempts, none begun after CLOSE_SECONDS.
CLOSE_ATTEMPTS = 12
CLOSE_SECONDS = 60
MAX_DELAY = 4.0
# MLflow's HTTP client retries on its own, by default 7 times with a backoff that adds up to
# minutes, and waits 120 s per request: an unreachable server would stall a stage that long.
# Bounded here unless the user set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
TRANSIENT = ("database is locked", "Max retries", "Connection", "timed out", "Read timed out")

T = TypeVar("T")


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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# (what MLflow's message holds, what to say): the cause of a failed HTTP call in a few words
# instead of urllib3's 400-character chain
_CAUSES = (
    ("Connection refused", "connection refused"),
    ("Failed to establish a new connection", "connection refused"),
    ("Read timed out", "no answer within MLFLOW_HTTP_REQUEST_TIMEOUT"),
    ("timed out", "timed out"),
    ("Connection reset", "connection reset"),
    ("RemoteDisconnected", "the server closed the connection"),
    ("Connection aborted", "the server closed the connection"),
)


def _cause(e: Exception) -> str:
    """Why a store call failed, in one short line: for an HTTP server the status and the
    endpoint that failed, and which part behind it that status points at."""
    text = str(e)
    status = _STATUS.search(text)
    url = re.search(r"API request to (?:endpoint )?(\S+)", text)
    endpoint = url[1].split("?")[0] if url else ""
    if "/mlflow-artifacts/artifacts/" in endpoint:  # the proxied object store: say which file
        root, _, path = endpoint.partition("/mlflow-artifacts/artifacts/")
        endpoint = f"{root}/mlflow-artifacts (uploading {path.rsplit('/', 1)[-1]})"
    if status:
        code = status[1] or status[2]
        if "mlflow-artifacts" in endpoint:
            behind = "the object store behind the server is down or refused the file"
        elif code.startswith("5"):
            behind = "the server or its database failed"
        else:
            behind = "the server refused the call"
        return f"{endpoint or 'the server'} answered HTTP {code}: {behind} (its log says why)"
    for needle, words in _CAUSES:
        if needle in text:
            return f"{words} ({endpoint})" if endpoint else words
    return _first_line(e)


_STATUS = re.compile(r"too many (\d{3}) error responses|error code (\d{3})")


# Stores that did not answer at all through a whole call (a server that is gone, not one that
# answers 5xx while its database restarts): the calls that follow (closing the run, its error
# tag) make one quick attempt, so a stage that fails says so at once.
_down: set[str] = set()


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP client without its own retries and with a short timeout, for a while."""
    saved = {k: os.environ.get(k) for k in HTTP_DEFAULTS}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def call(
    fn: Callable[[], T],
    what: str,
    also_transient: tuple[str, ...] = (),
    attempts: int = RETRY_ATTEMPTS,
    seconds: float = RETRY_SECONDS,
) -> T:
    """fn() with the retry policy; a store that stays unreachable, or refuses the call, is a
    TrackingError naming the store and what was being done. `also_transient`: messages that
    mean "try again" for this call only (a race another client won). `attempts`, `seconds`:
    at most that many tries, none begun after that many seconds."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    start = time.monotonic()
    quick = uri in _down
    for attempt in range(1 if quick else attempts):
        try:
            with _quick_http() if quick else contextlib.nullcontext():
                result = fn()
            _down.discard(uri)
            return result
        except Exception as e:  # MLflow wraps sqlite/HTTP errors in several types
            transient = any(t in str(e) for t in (*TRANSIENT, *also_transient))
            delay = min(RETRY_DELAY * 2**attempt, MAX_DELAY)
            late = time.monotonic() - start + delay > seconds
            if transient and not quick and attempt < attempts - 1 and not late:
                time.sleep(delay)
                continue
            if transient:
                # a server that answers with an error status is there, but cannot do the call
                answered = bool(_STATUS.search(str(e)))
                if not answered:
                    _down.add(uri)
                tried = f"; tried for {time.monotonic() - start:.0f} s" if not quick else ""
                how = "failed" if answered else "is unreachable"
                raise TrackingError(
                    f"MLflow store {uri} {how} while {what}: {_cause(e)}{tried}"
                ) from None
            if isinstance(e, MlflowException):
                raise TrackingError(f"MLflow store {uri} refused {what}: {_cause(e)}") from None
            raise
    raise AssertionError("unreachable")


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

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
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
            return call(get_or_create, f"opening experiment '{experiment}'")
        except TrackingError:
            raise
        except Exception as e:  # a damaged or foreign database, a server that errors
            raise TrackingError(
                f"cannot open MLflow experiment '{experiment}' in the store {uri}: "
                f"{_first_line(e)}"
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


def git_commit() -> str | None:
    """The commit the working tree is at (HEAD), or None outside a git checkout."""
    return _git("rev-parse", "HEAD")


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
    commit = git_commit()
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


def _start(experiment, run_id, run_name, tags, system_metrics):
    """The active MLflow run: a new one in `experiment`, or `run_id` reopened."""
    import logging

    import mlflow

    # the monitor announces its start and stop at INFO on every run: noise in a stage's output
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    exp_id = setup(experiment)
    if run_id is not None:
        active = call(
            lambda: mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics),
            f"reopening run {run_id}",
        )
        if tags:
            set_tags(tags)
        return active
    return call(
        lambda: mlflow.start_run(
            experiment_id=exp_id,
            run_name=run_name or os.environ.get("DVC_EXP_NAME") or None,
            tags=tags,
            log_system_metrics=system_metrics,
        ),
        "starting a run",
    )


@contextlib.contextmanager
def run(
    experiment: str,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Start (or reopen, given run_id) an MLflow run; close it FINISHED/FAILED/KILLED.

    system_metrics: also sample CPU, memory (and GPU, with nvidia-ml-py) every 10 s into the
    run's system/* metrics while the block runs.
    """
    import mlflow

    active = _start(experiment, run_id, run_name, tags, system_metrics)
    run_id = active.info.run_id
    status, why = "FAILED", None
    try:
        with signals.handled():
            yield active
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {e}"[:5000]
        raise
    finally:
        # Closed with a longer retry: a database that restarts is back in time to mark the
        # run FAILED (a server that is gone gets one quick attempt).
        # (The store is told first: mlflow.end_run forgets the run before it calls the store,
        # so a retried end_run would close nothing.)
        try:
            close = lambda: mlflow.MlflowClient().set_terminated(run_id, status)  # noqa: E731
            call(close, f"closing run {run_id}", (), CLOSE_ATTEMPTS, CLOSE_SECONDS)
        except TrackingError:
            with contextlib.suppress(Exception), _quick_http():
                mlflow.end_run(status=status)  # this process's state; the store is away
            if status == "FINISHED":
                raise
            # the error on its way out says what failed; the run stays RUNNING in a store
            # that is away until a rerun of train reopens it
        else:
            with contextlib.suppress(TrackingError):  # closed already; this ends it here
                call(lambda: mlflow.end_run(status=status), f"closing run {run_id}")
            if why:  # why it failed, readable in `mlflow ui` beside the FAILED status
                with contextlib.suppress(Exception):
                    tag = lambda: mlflow.MlflowClient().set_tag(run_id, "error", why)  # noqa: E731
                    call(tag, "setting the error tag")


# --- what a stage logs into the active run -------------------------------------------------


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    call(lambda: mlflow.log_params(params), "logging params")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    call(lambda: mlflow.log_metrics(metrics, step=step), "logging metrics")


def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    call(lambda: mlflow.set_tags(tags), "setting tags")


def last_step(run_id: str, key: str) -> int:
    """The highest step logged for metric `key` in run `run_id` (0 when none)."""
    import mlflow

    history = call(lambda: mlflow.MlflowClient().get_metric_history(run_id, key), f"reading {key}")
    return max((m.step for m in history), default=0)


def log_artifacts(local_dir: str | Path, artifact_path: str) -> None:
    import mlflow

    call(
        lambda: mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path),
        f"uploading {local_dir}",
    )


def log_artifact(path: str | Path, artifact_path: str) -> None:
    import mlflow

    call(lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path), f"uploading {path}")


def log_image(image, key: str, step: int) -> None:
    """An image (uint8 [H, W] or [H, W, 3]) under `key` at `step`: the UI steps through them."""
    import mlflow

    # synchronous: mlflow.log_image uploads in a background queue by default, where a failed
    # upload is only logged by MLflow and the picture silently missing from the run
    call(
        lambda: mlflow.log_image(image, key=key, step=step, synchronous=True),
        f"logging image '{key}'",
    )


def log_dataset(
    name: str, source: str, digest: str, x, y, context: str, tags: dict[str, str] | None = None
) -> None:
    """A dataset input of the run (the UI's Dataset column): its name, where it came from, our
    content digest, and the shapes of x and y."""
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.data.sources import LocalArtifactDatasetSource

    src = (
        HTTPDatasetSource(source)
        if source.startswith(("http://", "https://"))
        else LocalArtifactDatasetSource(source)
    )
    dataset = from_numpy(x, source=src, targets=y, name=name, digest=digest)
    call(
        lambda: mlflow.log_input(dataset, context=context, tags=tags),
        f"logging dataset {name}",
        # two runs logging the same new dataset at once: the store creates it for one of them
        # and refuses the other, whose next attempt finds it (sqlite, PostgreSQL wording)
        also_transient=("UNIQUE constraint failed", "duplicate key value"),
    )
