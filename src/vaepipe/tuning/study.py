"""The worker of `vaepipe tune`: asks Optuna's sampler for a trial's params, runs the trial as
`dvc exp run -n STUDY-N -S key=value ...` in this project, and reads its objective back from
the trial's MLflow run. Several workers (one per clone, on one machine or several) share a
study through its database; a worker killed outright leaves a trial whose heartbeat stops, and
the next worker to start a trial marks it failed and runs its params again."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
import re
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from vaepipe import config, signals, tracking
from vaepipe.errors import VaepipeError, first_line, redact
from vaepipe.fileio import atomic_path, read_json
from vaepipe.tuning import summary
from vaepipe.tuning import trial as trial_side
from vaepipe.tuning.space import TuneConfig, params_text, yaml_text

HOME = Path("tuning")  # the default study database, each study's logs and summary
STORAGE_ENV = "VAEPIPE_TUNE_STORAGE"
MAX_FAILED_IN_A_ROW = 3
STORAGE_ATTEMPTS = 4  # opening a new database that another worker is creating too
STOP_SECONDS = 120  # a trial's dvc, asked to stop, gets this long before it is killed


class TrialFailed(Exception):
    """The trial's `dvc exp run` failed (not pruned): Optuna records it FAIL and goes on."""


@dataclass
class Worker:
    cfg: TuneConfig
    storage_url: str
    experiment: str  # MLflow experiment of params.yaml
    params_text: str  # params.yaml as it was: each trial starts from it
    parent_run: str | None = None
    failed_in_a_row: int = 0

    @property
    def logs(self) -> Path:
        return HOME / self.cfg.study


def storage_url(cfg: TuneConfig, given: str | None) -> str:
    url = given or os.environ.get(STORAGE_ENV) or cfg.storage
    if url:
        return url
    HOME.mkdir(exist_ok=True)
    return f"sqlite:///{(HOME / 'optuna.db').resolve()}"


def open_storage(url: str, heartbeat: int):
    """Optuna's database storage with heartbeats (a stale trial is failed, then retried once);
    an unreachable database or a wrong password is one line, before any trial."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=4 * heartbeat,
                    heartbeat_stale_trial_callback=(
                        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                    ),
                )
        except (IntegrityError, OperationalError, ProgrammingError) as e:
            # Two workers starting on a new database at once both create Optuna's tables; the
            # one that loses the race sees a duplicate table, type or version row: the tables
            # exist now. Anything else (unreachable, wrong password) is final.
            lost_race = not isinstance(e, OperationalError) or "already exists" in str(e)
            if not lost_race or attempt + 1 == STORAGE_ATTEMPTS:
                why = first_line(e)
                raise VaepipeError(f"cannot open the study storage {redact(url)}: {why}") from None
            time.sleep(0.5 + random.random())
        except Exception as e:
            why = first_line(e)
            raise VaepipeError(f"cannot open the study storage {redact(url)}: {why}") from None


def open_study(cfg: TuneConfig, storage):
    import optuna

    # ERROR: a failed trial is our own line (with the log's last error), not a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=cfg.pruning.startup_trials, n_warmup_steps=cfg.pruning.min_epochs
    )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=cfg.study,
            pruner=pruner,
            directions=cfg.directions,
            load_if_exists=True,
        )
    except Exception as e:
        raise VaepipeError(f"cannot open study '{cfg.study}': {redact(str(e))}") from None
    if len(study.directions) != len(cfg.directions):
        raise VaepipeError(
            f"study '{cfg.study}' has {len(study.directions)} objective(s) and tune.yaml asks "
            f"for {len(cfg.directions)} (with_train_seconds); name another study"
        )
    study.sampler = sampler(cfg, offset=len(study.trials))
    if not study.trials:
        check_names_free(cfg.study)
        for first in cfg.enqueue:
            study.enqueue_trial(first, skip_if_exists=True)
    return study


def sampler(cfg: TuneConfig, offset: int):
    """TPE (with a constant liar: trials other workers are running count as bad guesses, so
    workers spread out) or random; a worker joining a study later draws from the seed moved
    by the trials so far, so workers with one tune.yaml do not repeat each other's draws."""
    import optuna

    seed = None if cfg.seed is None else cfg.seed + offset
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # constant_liar is "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def check_names_free(study: str) -> None:
    """A new study names its experiments STUDY-0, STUDY-1...: refused while experiments of
    an earlier study of that name exist on this commit (DVC would refuse each trial)."""
    listed = subprocess.run(
        ["dvc", "exp", "list", "--name-only"], capture_output=True, text=True, timeout=120
    )
    taken = [n for n in listed.stdout.split() if re.fullmatch(rf"{re.escape(study)}-\d+", n)]
    if taken:
        raise VaepipeError(
            f"experiments of an earlier study '{study}' exist here ({', '.join(taken[:3])}...): "
            f"`dvc exp remove {' '.join(taken[:3])} ...` first, or name another study"
        )


@contextlib.contextmanager
def only_worker_here():
    """One worker per project folder: `dvc exp run` uses the workspace."""
    HOME.mkdir(exist_ok=True)
    with open(HOME / "worker.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaepipeError(
                "another vaepipe tune runs in this project; a second worker needs its own clone"
            ) from None
        yield


_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """What the child runs before exec: SIGTERM when the worker dies. libc is loaded here, in
    the parent, not after the fork (the heartbeat thread may hold a lock then)."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # not Linux: a killed worker's dvc runs its trial to the end
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_dvc(argv: list[str], env: dict, log: Path) -> int:
    """`dvc exp run ...` in a session of its own, with its output in `log`. A signal to the
    worker becomes SIGINT to that session (the stage stops as on Ctrl-C: its run KILLED, a
    checkpoint saved; dvc waits for it); a worker killed outright has the kernel send dvc
    SIGTERM, and the stage stops with dvc."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        try:
            with signals.handled():
                return proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, STOP_SECONDS), (signal.SIGKILL, 30)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "ERROR:"))]
    return (errors or lines or ["no output"])[-1][:300]


def trial_command(name: str, values: dict) -> list[str]:
    """Up to evaluate: the experiment's headline metrics (metrics/summary.json, what `dvc exp
    show` lists) are then the trial's own, whatever the objective; export is left to the trial
    brought back (`dvc exp apply`, then `dvc repro`)."""
    sets = [a for k, v in values.items() for a in ("-S", f"{k}={yaml_text(v)}")]
    return ["dvc", "exp", "run", "-n", name, *sets, "evaluate"]


def read_objective(worker: Worker, number: int) -> tuple[list[float], str]:
    """The trial's objective(s) from its MLflow run (the run id of metrics/train.json). Params
    a run has trained with before are restored by DVC's run cache, not trained again: the
    objective is then that run's (the same params and code)."""
    import mlflow

    run_id = read_json("metrics/train.json")["run_id"]
    tracking.setup(worker.experiment)
    client = mlflow.MlflowClient()
    run = tracking.call(lambda: client.get_run(run_id), f"reading run {run_id}")
    if run.data.tags.get(trial_side.TRIAL_TAG) != str(number):
        print(f"trial {number}: DVC restored train from its run cache (MLflow run {run_id})")
    metrics = run.data.metrics
    if worker.cfg.objective == "test":
        values = [metrics["test/nll_iwae"]]
    else:
        best = int(metrics["best_epoch"])
        key = "iwae/val" if "iwae/val" in metrics else "elbo/val"
        history = tracking.call(lambda: client.get_metric_history(run_id, key), "reading")
        values = [-next(m.value for m in history if m.step == best)]
    if worker.cfg.with_train_seconds:
        values.append(metrics["train_seconds"])
    return values, run_id


def objective(worker: Worker):
    import optuna

    def run_trial(trial: optuna.Trial):
        values = {d.key: d.suggest(trial) for d in worker.cfg.space}
        name = f"{worker.cfg.study}-{trial.number}"
        trial.set_user_attr("dvc_exp", name)
        print(f"trial {trial.number}: {params_text(values)}", flush=True)
        # the study's run as the study records it (summary.parent_run: the first recorded)
        worker.parent_run = trial.study.user_attrs.get(summary.PARENT_ATTR, worker.parent_run)
        link = trial_side.Link(
            storage=worker.storage_url,
            study=worker.cfg.study,
            trial_id=trial._trial_id,
            number=trial.number,
            parent_run=worker.parent_run,
            prunes=worker.cfg.prunes,
            min_epochs=worker.cfg.pruning.min_epochs,
            startup_trials=worker.cfg.pruning.startup_trials,
            objectives=len(worker.cfg.directions),
        )
        restore_params(worker)
        env = {**os.environ, trial_side.ENV: link.to_env(), "DVC_NO_ANALYTICS": "1"}
        log = worker.logs / f"trial-{trial.number}.log"
        rc = run_dvc(trial_command(name, values), env, log)
        attrs = trial.study._storage.get_trial(trial._trial_id).user_attrs
        if rc != 0 and trial_side.PRUNED_ATTR in attrs:
            raise optuna.TrialPruned(f"at epoch {attrs[trial_side.PRUNED_ATTR]}")
        if rc != 0:
            worker.failed_in_a_row += 1
            why = f"dvc exp run failed: {last_error(log)} (all of it: {log})"
            trial.set_user_attr("error", why)
            raise TrialFailed(why)
        try:
            result, run_id = read_objective(worker, trial.number)
        except (KeyError, StopIteration, OSError, ValueError, tracking.TrackingError) as e:
            worker.failed_in_a_row += 1
            why = f"no objective in the trial's run ({type(e).__name__}: {e})"
            trial.set_user_attr("error", redact(why))
            raise TrialFailed(why) from None
        worker.failed_in_a_row = 0
        trial.set_user_attr("mlflow_run", run_id)
        return result if worker.cfg.with_train_seconds else result[0]

    return run_trial


def restore_params(worker: Worker) -> None:
    """params.yaml as it was before the search (a trial's -S values stay in its experiment)."""
    path = Path("params.yaml")
    if path.read_text() != worker.params_text:
        with atomic_path(path) as tmp:
            tmp.write_text(worker.params_text)


def progress(worker: Worker):
    import optuna

    def on_trial_end(study: optuna.Study, frozen) -> None:
        state = frozen.state.name.lower()
        value = "" if frozen.values is None else " ".join(f"{v:.2f}" for v in frozen.values)
        if frozen.state == optuna.trial.TrialState.PRUNED and frozen.intermediate_values:
            epoch = max(frozen.intermediate_values)
            value = f"at epoch {epoch} ({frozen.intermediate_values[epoch]:.2f} nats)"
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = ""
        if done and len(study.directions) == 1:
            b = min(done, key=lambda t: t.value)
            best = f" | best {b.value:.2f} nats (trial {b.number})"
        if frozen.state == optuna.trial.TrialState.FAIL:
            value = frozen.user_attrs.get("error", "")
        print(f"trial {frozen.number}: {state} {value}{best}".rstrip(), flush=True)
        if worker.failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            study.stop()
            print(f"tune: {MAX_FAILED_IN_A_ROW} trials in a row failed; stopping this worker")

    return on_trial_end


def sqlalchemy_error() -> type:
    from sqlalchemy.exc import SQLAlchemyError

    return SQLAlchemyError


def check_pipeline_ran() -> None:
    """Every stage of dvc.yaml has run here (dvc.lock): a trial runs up to evaluate, and the
    experiment it leaves carries export's outputs from this workspace, so that `dvc exp apply`
    of a trial brings a whole pipeline back."""
    import yaml

    def stages(path: Path) -> set:
        return set((yaml.safe_load(path.read_text()) or {}).get("stages", {}))

    ran = stages(Path("dvc.lock")) if Path("dvc.lock").exists() else set()
    missing = sorted(stages(Path("dvc.yaml")) - ran)
    if missing:
        raise VaepipeError(
            f"the pipeline has not run here ({', '.join(missing)} not in dvc.lock): run "
            "`dvc repro` once before tuning, so each trial's experiment holds every stage"
        )


def run_worker(cfg: TuneConfig, storage: str | None, trials: int | None, timeout: float | None):
    """Run trials until the study holds `trials` finished ones (complete or pruned, all
    workers together), or `timeout` minutes have passed; returns the study."""
    import optuna

    params = config.load()
    url = storage_url(cfg, storage)
    if cfg.objective == "test":
        print(
            "tune: objective test: every trial is judged on test/nll_iwae, so the best figure "
            "found is no longer an unbiased estimate on the test set"
        )
    with only_worker_here():
        storage = open_storage(url, cfg.heartbeat_seconds)
        check_pipeline_ran()
        study = open_study(cfg, storage)
        worker = Worker(cfg, url, params.mlflow.experiment, Path("params.yaml").read_text())
        worker.parent_run = summary.parent_run(study, storage, worker.experiment)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        wanted = trials or cfg.trials
        limit = optuna.study.MaxTrialsCallback(wanted, states=finished)
        minutes = timeout if timeout is not None else cfg.timeout_minutes
        done = len(study.get_trials(deepcopy=False, states=finished))
        if done >= wanted:
            print(f"tune: study {cfg.study} has {done} finished trials; --trials N asks for more")
            wanted = 0
        try:
            if wanted:
                study.optimize(
                    objective(worker),
                    timeout=minutes * 60 if minutes else None,
                    callbacks=[limit, progress(worker)],
                    catch=(TrialFailed,),
                )
        except (optuna.exceptions.StorageInternalError, sqlalchemy_error()) as e:
            why = first_line(e)
            raise VaepipeError(f"the study storage {redact(url)} failed: {why}") from None
        finally:
            restore_params(worker)
        parent = study.user_attrs.get(summary.PARENT_ATTR, worker.parent_run)
        summary.finish(study, parent, worker.experiment, worker.logs)
        return study
