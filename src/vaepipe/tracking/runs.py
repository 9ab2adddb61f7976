"""MLflow runs: their lifecycle and every logging call of the stages, each through the store's
retry policy (vaepipe.tracking.store). Our code never leaves a run RUNNING: an exception marks it
FAILED, Ctrl-C / SIGTERM marks it KILLED.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vaepipe import signals
from vaepipe.fileio import process_alive
from vaepipe.tracking.store import (
    CLOSE_ATTEMPTS,
    CLOSE_SECONDS,
    TrackingError,
    _git,
    _quick_http,
    call,
    check_own_artifacts,
    default_run_name,
    git_commit,
    setup,
)


def run_exists(experiment: str, run_id: str) -> bool:
    """Is `run_id` a run of the current store (a resumed checkpoint may outlive its store)?"""
    import mlflow

    setup(experiment)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST) or a store that is gone
        return False
    return True


def run_tags(dataset: str, device: str, device_name: str = "") -> dict[str, str]:
    """The run's provenance: data, where it computed (device, and its name: the GPU's, or the
    CPU's model and cores), versions, the commit and DVC experiment."""
    import torch

    tags = {"dataset": dataset, "device": device, "torch_version": torch.__version__}
    if device_name:
        tags["device_name"] = device_name
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


# which process holds a run open: a later stage on the same machine closes a run whose process
# is gone (killed outright: SIGKILL, the OOM killer, a power cut) instead of leaving it RUNNING
HOST_TAG, PID_TAG = "vaepipe.host", "vaepipe.pid"


def close_abandoned(exp_id: str, keep: str | None = None) -> list[str]:
    """Close KILLED the runs of `exp_id` left RUNNING by a process of this machine that is
    gone (all but `keep`), each with an `error` tag saying so; their ids."""
    import socket

    import mlflow

    host = socket.gethostname()
    client = mlflow.MlflowClient()
    found = call(
        lambda: client.search_runs(
            [exp_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
        ),
        "looking for runs left open",
    )
    closed = []
    for r in found:
        pid = r.data.tags.get(PID_TAG, "")
        if r.info.run_id == keep or not pid.isdigit() or process_alive(int(pid)):
            continue
        # read again just before closing: a stage beside this one (dvc queue -j 2) may have
        # reopened it since the search, with its own pid
        now = call(lambda: client.get_run(r.info.run_id), "reading a run left open")  # noqa: B023
        if now.info.status != "RUNNING" or now.data.tags.get(PID_TAG) != pid:
            continue
        why = (
            f"its process (pid {pid} on {host}) ended without closing it (killed outright); "
            "closed by a later stage"
        )
        left = r.info.run_id
        call(lambda: client.set_tag(left, "error", why), "tagging a run left open")  # noqa: B023
        call(lambda: client.set_terminated(left, "KILLED"), "closing a run left open")  # noqa: B023
        closed.append(left)
    return closed


def _start(experiment, run_id, run_name, tags, system_metrics):
    """The active MLflow run: a new one in `experiment`, or `run_id` reopened; tagged with the
    process that holds it, after closing the runs such processes left open."""
    import logging
    import socket

    import mlflow

    # the monitor announces its start and stop at INFO on every run: noise in a stage's output
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    exp_id = setup(experiment)
    close_abandoned(exp_id, keep=run_id)
    tags = {**(tags or {}), HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    if run_id is not None:
        client = mlflow.MlflowClient()
        found = call(lambda: client.get_run(run_id), f"reading run {run_id}")
        check_own_artifacts(found.info.artifact_uri, f"run {run_id}")
        # this process's host and pid before the run is RUNNING again: a stage starting beside
        # this one must not take it for a run left open by the process that is gone
        for key in (HOST_TAG, PID_TAG):
            call(lambda key=key: client.set_tag(run_id, key, tags[key]), "tagging the run")
        active = call(
            lambda: mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics),
            f"reopening run {run_id}",
        )
        set_tags(tags)
        return active
    return call(
        lambda: mlflow.start_run(
            experiment_id=exp_id,
            run_name=run_name or os.environ.get("DVC_EXP_NAME") or default_run_name(),
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
        status = getattr(e, "run_status", "FAILED")  # a pruned trial: KILLED
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
            _set_error_tag(run_id, why, finished=status == "FINISHED")


def _set_error_tag(run_id: str, why: str | None, finished: bool) -> None:
    """Why the run failed, readable in `mlflow ui` beside the FAILED status; a run that ends
    well after an earlier failure or closing (a resumed one) loses the old reason, read from
    the store now: another stage may have written it while this one ran."""
    import mlflow

    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):
        if why:
            call(lambda: client.set_tag(run_id, "error", why), "setting the error tag")
        elif finished and "error" in client.get_run(run_id).data.tags:
            call(lambda: client.delete_tag(run_id, "error"), "clearing the error tag")


def mark_failed(experiment: str, run_id: str, why: str) -> None:
    """End run `run_id` FAILED with `why` as its error tag: a stage after training that found
    the model unfit (export's parity gate) records it in the run it reports to."""
    import mlflow

    setup(experiment)
    client = mlflow.MlflowClient()
    call(lambda: client.set_tag(run_id, "error", why[:5000]), "setting the error tag")
    call(
        lambda: client.set_terminated(run_id, "FAILED"),
        f"closing run {run_id}",
        (),
        CLOSE_ATTEMPTS,
        CLOSE_SECONDS,
    )


# --- what a stage logs into the active run -------------------------------------------------


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    call(lambda: mlflow.log_params(params), "logging params")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """One batch of metrics at `step`, logged once: a store can commit a batch and then drop
    the connection before it answers (a database restart), so a retry first looks whether the
    batch landed (one transaction: its first metric tells) instead of logging it twice."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    tried = False

    def once() -> None:
        nonlocal tried
        if tried and _landed(run_id, metrics, step or 0):
            return
        tried = True
        mlflow.log_metrics(metrics, step=step)

    call(once, "logging metrics")


def _landed(run_id: str, metrics: dict[str, float], step: int) -> bool:
    import mlflow

    if not metrics:
        return True
    key, value = next(iter(metrics.items()))
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return any(m.step == step and m.value == float(value) for m in history)


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


def log_table(columns: dict[str, list], artifact_file: str) -> None:
    """A table artifact (MLflow shows it on the run's artifacts page, outside the chart grid)."""
    import mlflow

    call(lambda: mlflow.log_table(columns, artifact_file), f"logging table {artifact_file}")


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
    name: str,
    *,
    source: str,
    digest: str,
    x,
    y,
    context: str,
    tags: dict[str, str] | None = None,
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
