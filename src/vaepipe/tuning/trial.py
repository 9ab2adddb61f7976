"""The train stage's side of a `vaepipe tune` trial. The worker runs the trial as a DVC
experiment with VAEPIPE_TRIAL in its environment (never in params: DVC's hashes stay those of a
plain run); train then tags its MLflow run with the study and trial, reports each epoch's
validation bound to the trial, and stops when the study's pruner says so. Without the
variable this module does nothing and Optuna is never imported."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from vaepipe.errors import VaepipeError, first_line

ENV = "VAEPIPE_TRIAL"
STUDY_TAG, TRIAL_TAG = "vaepipe.study", "vaepipe.trial"
PRUNED_ATTR = "pruned_at_epoch"  # the trial's user attr: how its worker tells pruned from failed


class TrialPruned(VaepipeError):
    """The study's pruner stopped this trial: its run ends KILLED, the stage exits 3."""

    exit_code = 3
    run_status = "KILLED"  # tracking.run closes the MLflow run with it


@dataclass(frozen=True)
class Link:
    storage: str  # the study's database URL (may hold a password: never a tag or a param)
    study: str
    trial_id: int
    number: int
    parent_run: str | None
    prunes: bool
    min_epochs: int
    startup_trials: int
    objectives: int = 1  # Optuna takes per-epoch reports of single-objective studies only

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    def tags(self) -> dict[str, str]:
        tags = {STUDY_TAG: self.study, TRIAL_TAG: str(self.number)}
        if self.parent_run:
            tags["mlflow.parentRunId"] = self.parent_run  # MLflow nests the run under the study
        return tags


def from_env() -> Link | None:
    text = os.environ.get(ENV)
    if not text:
        return None
    try:
        return Link(**json.loads(text))
    except (ValueError, TypeError) as e:
        raise VaepipeError(f"{ENV} is not the description of a trial ({e})") from None


def validation_nll(val: dict[str, float]) -> float:
    """What a trial reports and is judged on: minus the validation bound that chooses the best
    epoch (the IWAE bound when training on it, else the ELBO), in nats: lower is better."""
    return -val.get("iwae", val["elbo"])


class Reporter:
    """Reports each epoch's validation NLL bound to the trial; raises TrialPruned when told."""

    def __init__(self, link: Link):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.link = link
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=link.startup_trials, n_warmup_steps=link.min_epochs
        )
        try:
            study = optuna.load_study(study_name=link.study, storage=link.storage, pruner=pruner)
            self.trial = optuna.trial.Trial(study, link.trial_id)
        except Exception as e:
            raise VaepipeError(
                f"cannot reach study '{link.study}' of trial {link.number}: {first_line(e)}"
            ) from None

    def __call__(self, epoch: int, val: dict[str, float]) -> None:
        value = validation_nll(val)
        try:
            self.trial.report(value, epoch)
            pruned = self.link.prunes and self.trial.should_prune()
            if pruned:
                self.trial.set_user_attr(PRUNED_ATTR, epoch)
        except Exception as e:  # the trial was closed (its worker gone) or the store is away
            raise VaepipeError(
                f"trial {self.link.number} of study '{self.link.study}' can no longer be "
                f"reported to ({type(e).__name__}: {str(e)[:200]}); its worker has stopped?"
            ) from None
        if pruned:
            raise TrialPruned(
                f"trial {self.link.number} of study '{self.link.study}' pruned at epoch "
                f"{epoch}: validation bound {value:.2f} nats, worse than the median of the "
                "trials before it at that epoch"
            )


def reporter() -> Reporter | None:
    link = from_env()
    return Reporter(link) if link and link.objectives == 1 else None
