"""What a study shows its user: an MLflow parent run under which its trials' runs nest, and at
the end the best trials with the command that brings each back, the parameter importances and
the optimisation history as pictures (also on the parent run), the Pareto front when time is
a second objective."""

from __future__ import annotations

import contextlib
from pathlib import Path

from vaepipe import tracking
from vaepipe.tuning.space import params_text
from vaepipe.tuning.trial import STUDY_TAG

ROLE_TAG = "vaepipe.role"
PARENT_ATTR = "mlflow_parent_run"
TOP = 5


def parent_run(study, storage, experiment: str) -> str:
    """The study's MLflow run (created once, closed at once: it is a folder for the trials'
    runs and the summary, never left RUNNING); its id is kept in the study. Of workers that
    start together, each makes a run and the first to record its own in the study wins; the
    others delete theirs, so that every trial nests under the one run."""
    import mlflow

    known = study.user_attrs.get(PARENT_ATTR)
    client = mlflow.MlflowClient(tracking.setup_uri())
    if known and tracking.run_exists(experiment, known):
        return known
    exp_id = tracking.setup(experiment)
    run = tracking.call(
        lambda: client.create_run(
            exp_id,
            run_name=f"study {study.study_name}",
            tags={STUDY_TAG: study.study_name, ROLE_TAG: "study"},
        ),
        "creating the study's run",
    )
    tracking.call(lambda: client.set_terminated(run.info.run_id, "FINISHED"), "closing it")
    if _replace_attr(storage, study.study_name, PARENT_ATTR, known, run.info.run_id):
        return run.info.run_id
    with contextlib.suppress(Exception):
        client.delete_run(run.info.run_id)
    return study.user_attrs[PARENT_ATTR]


def _replace_attr(storage, study_name: str, key: str, old, new) -> bool:
    """Set the study's user attribute `key` to `new` only if it still holds `old` (None: not
    set yet), in one statement of the study's database: whether this call set it. Optuna's
    own setter writes whatever was there, so the last of two workers would win, after the
    first had already nested a trial under its own run."""
    import json

    from optuna.storages._rdb import models
    from sqlalchemy.exc import IntegrityError

    table = models.StudyUserAttributeModel.__table__
    study_id = storage.get_study_id_from_name(study_name)
    value = json.dumps(new)
    try:
        with storage.engine.begin() as conn:
            if old is None:
                conn.execute(table.insert().values(study_id=study_id, key=key, value_json=value))
                return True
            done = conn.execute(
                table.update()
                .where(table.c.study_id == study_id, table.c.key == key)
                .where(table.c.value_json == json.dumps(old))
                .values(value_json=value)
            )
            return done.rowcount == 1
    except IntegrityError:  # another worker's insert came first
        return False


def _complete(study) -> list:
    """The complete trials, by number (a pruned one has a value too: its last report)."""
    return [t for t in study.trials if t.state.name == "COMPLETE"]


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def best_lines(study) -> list[str]:
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda t: t.values[0])
        head = ["Pareto front (NLL bound in nats, training seconds):"]
        return head + [
            _trial_line(t, f"{t.values[0]:.2f} nats, {t.values[1]:.0f} s") for t in front
        ]
    ranked = sorted(done, key=lambda t: t.value)[:TOP]
    return ["Best trials (nats, lower is better):"] + [
        _trial_line(t, f"{t.value:.2f}") for t in ranked
    ]


def _trial_line(t, value: str) -> str:
    params = params_text(t.params)
    name = t.user_attrs.get("dvc_exp", "?")
    return f"  trial {t.number}: {value} | {params} | dvc exp apply {name}"


def importances(study) -> dict[str, float]:
    import optuna

    if len(_complete(study)) < 2:
        return {}
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        return optuna.importance.get_param_importances(study, evaluator=fanova, target=target)
    except (RuntimeError, ValueError):  # e.g. a single value of every param so far
        return {}


def pictures(study, folder: Path, weights: dict[str, float]) -> list[Path]:
    """history.png (each trial's objective and the best so far; pruned trials at their last
    report) and importances.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    done = _complete(study)
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    best = [min(t.values[0] for t in done[: i + 1]) for i in range(len(done))]
    if done:
        ax.plot([t.number for t in done], [t.values[0] for t in done], "o", label="complete")
        ax.step([t.number for t in done], best, where="post", label="best so far")
    if pruned:  # at their last report
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.plot([t.number for t in pruned], last, "x", color="tab:red", label="pruned")
    ax.set(xlabel="trial", ylabel="NLL bound (nats)", title=f"study {study.study_name}")
    if done or pruned:
        ax.legend()
    ax.grid(alpha=0.3)
    out.append(_save(fig, folder / "history.png"))
    if weights:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(weights)))
        ax.barh(list(weights)[::-1], list(weights.values())[::-1], color="tab:blue")
        ax.set(xlabel="importance (fANOVA)", title="parameter importances")
        out.append(_save(fig, folder / "importances.png"))
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from vaepipe.fileio import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def text(study, weights: dict[str, float]) -> str:
    counts = _counts(study)
    head = f"study {study.study_name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [head, *best_lines(study)]
    if weights:
        lines.append(
            "Parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items())
        )
    return "\n".join(lines)


def _metrics(study) -> list:
    """best_nll after each trial (the history as an MLflow curve) and the trial counts."""
    import time

    from mlflow.entities import Metric

    now, best, out = int(time.time() * 1000), float("inf"), []
    for t in _complete(study):
        best = min(best, t.values[0])
        out.append(Metric("best_nll", best, now, t.number))
    out += [Metric(f"trials_{k}", n, now, 0) for k, n in _counts(study).items()]
    return out


def finish(study, parent: str, experiment: str, folder: Path) -> str:
    """The summary: printed, written to tuning/STUDY/summary.md with the pictures, and logged to
    the study's MLflow run (the best value after each trial as its `best_nll` curve)."""
    import mlflow

    weights = importances(study)
    body = text(study, weights)
    print(body)
    pictures(study, folder, weights)
    with (folder / "summary.md").open("w") as f:
        f.write(body + "\n")
    tracking.setup(experiment)
    client = mlflow.MlflowClient()
    tracking.call(lambda: client.log_batch(parent, metrics=_metrics(study)), "logging the study")
    tracking.call(lambda: client.log_artifacts(parent, str(folder), "study"), "uploading")
    return body
