"""The MLflow store: where it is, one retry policy for every call to it, one clear error when it
stays away, and the experiment every run goes to.

Store: MLFLOW_TRACKING_URI if set, else sqlite:///<root>/mlruns/mlflow.db with artifacts in
<root>/mlruns/artifacts, where <root> is DVC_ROOT (queued `dvc exp` runs execute in a temporary
copy that DVC deletes) or the project root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

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
            with signals.uninterrupted(), _quick_http() if quick else contextlib.nullcontext():
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
            if unusable := _unusable(e):
                raise TrackingError(f"MLflow store {uri} {unusable} ({what})") from None
            raise
    raise AssertionError("unreachable")


def _unusable(e: Exception) -> str | None:
    """What makes a store unusable in a few words: a file that is not an MLflow database, a
    database driver that is not installed; None for other errors (bugs keep their traceback)."""
    if isinstance(e, ImportError):
        driver = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}.get(
            e.name or "", e.name
        )
        return f"needs the Python package {driver}, which is not installed (pip install {driver})"
    if type(e).__module__.startswith("sqlalchemy"):
        return f"cannot be read as an MLflow database: {_first_line(e)}"
    return None


def _check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    # user:password@ in the URI is HTTP basic auth (as MLflow's client sends it), not host name
    parts = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
    netloc = parts.netloc.rpartition("@")[2]
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        secret = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=5).read()
    except urllib.error.HTTPError:
        return  # it answered: what it says to the real calls is reported by them
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: "
            f"{getattr(e, 'reason', e)}"
        ) from None


def setup_existing_uri() -> str:
    """setup_uri for the commands that only read: a sqlite store that is not there is one line
    (where to run, what to set), never an empty store created in passing."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise VaepipeError(
            f"no MLflow store at {uri}: run this in a project whose pipeline has run "
            "(dvc repro), or set MLFLOW_TRACKING_URI to the team's store"
        )
    return setup_uri()


def setup_uri() -> str:
    """Resolve the store, check it answers, and point MLflow at it; returns the URI."""
    import mlflow

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # "Creating initial MLflow database tables..." at INFO on a new store: not the stage's news
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
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
            check_own_artifacts(exp.artifact_location, f"experiment '{experiment}'")
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


def check_own_artifacts(location: str | None, what: str) -> None:
    """The project's own store (<root>/mlruns/mlflow.db) keeps its artifacts inside it.
    MLflow records absolute artifact locations: in a copied or moved project they still name
    the original's folder, and logging would write there (deleting the original would lose
    the copy's artifacts). Refused in one line before anything is logged."""
    own_store = f"sqlite:///{project_root() / STORE_DIR / 'mlflow.db'}"
    if not location or tracking_uri() != own_store:
        return
    own = artifact_location(own_store)
    if own and location.startswith("file:") and not (location + "/").startswith(own + "/"):
        where = location.removeprefix("file://")
        raise TrackingError(
            f"{STORE_DIR}/ was copied or moved from another project: {what} keeps its "
            f"artifacts in {where}, outside this project's {STORE_DIR}/; logging would write "
            f"there. Move {STORE_DIR}/ aside to start a new store here, or point "
            "MLFLOW_TRACKING_URI at the original store"
        )


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


def git_commit() -> str | None:
    """The commit the working tree is at (HEAD), or None outside a git checkout."""
    return _git("rev-parse", "HEAD")


def default_run_name() -> str | None:
    """What a run of `dvc repro` is called: the branch and short commit it ran at
    ("main@3f2a1bc", "+edits" when tracked files other than dvc.lock differ from it, an
    edited params.yaml for one), None outside git."""
    commit = _git("rev-parse", "--short=7", "HEAD")
    if commit is None:
        return None
    branch = _git("symbolic-ref", "--short", "-q", "HEAD") or "detached"
    edited = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock")
    return f"{branch}@{commit}{'+edits' if edited else ''}"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
