"""`vaepipe tune`: the command line of the search (docs/tuning.md)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from vaepipe import signals
from vaepipe.errors import VaepipeError


def _check_project() -> None:
    if not (Path("dvc.yaml").is_file() and Path("params.yaml").is_file()):
        raise VaepipeError(
            "vaepipe tune runs in a vaepipe project, the folder with dvc.yaml and params.yaml "
            "(each trial is a `dvc exp run` there); cd into it"
        )
    head = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        raise VaepipeError("DVC experiments need a git commit to start from: commit the project")


def cmd_tune(args) -> str:
    from vaepipe.tuning import space, study

    _check_project()
    cfg = space.load(Path(args.config))
    if args.study:
        if not space.STUDY_NAME.fullmatch(args.study):
            raise VaepipeError("--study must be a name of letters, digits, . _ and -")
        cfg = dataclasses.replace(cfg, study=args.study)
    for name in ("trials", "timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise VaepipeError(f"--{name} must be > 0, not {value}")
    with signals.handled():  # SIGTERM as Ctrl-C: the trial's dvc stops, params.yaml is restored
        study.run_worker(cfg, args.storage, args.trials, args.timeout)
    return f"study {cfg.study}, this worker's part"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="search params with Optuna: each trial a DVC experiment and an MLflow run"
    )
    p.add_argument("--config", default="tune.yaml", help="search space (default: tune.yaml)")
    p.add_argument("--study", help="study name (default: tune.yaml's)")
    p.add_argument(
        "--trials", type=int, help="finished trials the study stops at, all workers together"
    )
    p.add_argument("--timeout", type=float, help="minutes this worker starts trials for")
    p.add_argument(
        "--storage",
        help="study database URL (default: $VAEPIPE_TUNE_STORAGE, tune.yaml's, else "
        "tuning/optuna.db); a PostgreSQL URL lets workers on several machines share the study",
    )
    p.set_defaults(fn=cmd_tune)
