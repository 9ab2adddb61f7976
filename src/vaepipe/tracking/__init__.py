"""MLflow, the only part of vaepipe that calls it: the store and its retry policy (`store`), runs
and what the stages log into them (`runs`), registered models (`registry`), the promotion gate
(`promotion`), model cards (`card`) and the comparison of runs (`compare`).

The stage scripts never import mlflow; they call the functions re-exported here.
"""

from vaepipe.tracking.runs import (
    last_step,
    log_artifact,
    log_artifacts,
    log_dataset,
    log_image,
    log_metrics,
    log_params,
    log_table,
    mark_failed,
    run,
    run_exists,
    run_tags,
    set_tags,
)
from vaepipe.tracking.store import (
    TrackingError,
    call,
    git_commit,
    project_root,
    setup,
    setup_existing_uri,
    setup_uri,
    tracking_uri,
)

__all__ = [
    "TrackingError",
    "call",
    "git_commit",
    "last_step",
    "log_artifact",
    "log_artifacts",
    "log_dataset",
    "log_image",
    "log_metrics",
    "log_params",
    "log_table",
    "mark_failed",
    "project_root",
    "run",
    "run_exists",
    "run_tags",
    "set_tags",
    "setup",
    "setup_existing_uri",
    "setup_uri",
    "tracking_uri",
]
