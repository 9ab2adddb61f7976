"""The train stage's side of a trial, against a real Optuna study in a temp SQLite file."""

import optuna
import pytest

from vaepipe.errors import VaepipeError
from vaepipe.tuning import trial


def link(storage: str, t: optuna.Trial, **kw) -> trial.Link:
    return trial.Link(
        storage=storage,
        study="s",
        trial_id=t._trial_id,
        number=t.number,
        parent_run="p",
        **{"prunes": True, "min_epochs": 2, "startup_trials": 1, **kw},
    )


@pytest.fixture
def study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = optuna.create_study(study_name="s", storage=storage)
    first = s.ask()
    for epoch in range(1, 6):
        first.report(30.0 - epoch, epoch)
    s.tell(first, 25.0)
    return storage, s


def test_a_trial_that_trails_the_median_is_pruned_once_it_ran_min_epochs(study, monkeypatch):
    storage, s = study
    t = s.ask()
    monkeypatch.setenv(trial.ENV, link(storage, t).to_env())
    report = trial.reporter()
    report(1, {"elbo": -100.0})  # before min_epochs: never pruned, however bad
    with pytest.raises(trial.TrialPruned) as e:
        report(2, {"elbo": -100.0})  # it has run its min_epochs
    assert e.value.exit_code == 3 and e.value.run_status == "KILLED" and "epoch 2" in str(e.value)
    frozen = s._storage.get_trial(t._trial_id)
    assert frozen.user_attrs[trial.PRUNED_ATTR] == 2
    assert frozen.intermediate_values == {1: 100.0, 2: 100.0}


def test_a_better_trial_reports_its_iwae_bound_and_runs_on(study, monkeypatch):
    storage, s = study
    t = s.ask()
    monkeypatch.setenv(trial.ENV, link(storage, t).to_env())
    report = trial.reporter()
    for epoch in range(1, 6):
        report(epoch, {"elbo": -20.0, "iwae": -19.5})  # the bound that picks the best epoch
    assert s._storage.get_trial(t._trial_id).intermediate_values[5] == 19.5
    tags = trial.from_env().tags()
    assert tags == {"vaepipe.study": "s", "vaepipe.trial": "1", "mlflow.parentRunId": "p"}


def test_no_trial_no_optuna_and_bad_descriptions_are_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv(trial.ENV, raising=False)
    assert trial.reporter() is None
    monkeypatch.setenv(trial.ENV, "garbage")
    with pytest.raises(VaepipeError, match="is not the description of a trial"):
        trial.from_env()
    gone = trial.Link(f"sqlite:///{tmp_path}/no/such/dir.db", "s", 1, 0, None, True, 1, 1)
    with pytest.raises(VaepipeError) as e:
        trial.Reporter(gone)
    assert "cannot reach study 's' of trial 0" in str(e.value) and "\n" not in str(e.value)


def test_a_trial_closed_under_it_stops_the_stage(study, monkeypatch):
    storage, s = study
    t = s.ask()
    report = trial.Reporter(link(storage, t))
    s.tell(t, state=optuna.trial.TrialState.FAIL)  # what a heartbeat does to a silent worker
    with pytest.raises(VaepipeError, match="can no longer be reported to"):
        report(1, {"elbo": -20.0})


def test_a_multi_objective_trial_reports_nothing(monkeypatch, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = optuna.create_study(study_name="s", storage=storage, directions=["minimize"] * 2)
    monkeypatch.setenv(trial.ENV, link(storage, s.ask(), objectives=2).to_env())
    assert trial.reporter() is None  # Optuna takes no per-epoch values from such a study


def test_the_summary_counts_pruned_trials_apart_from_complete_ones(study, tmp_path):
    from vaepipe.tuning import summary

    _, s = study
    t = s.ask()
    t.report(10.0, 1)  # better than the complete trial's 25, but pruned: not the best
    s.tell(t, state=optuna.trial.TrialState.PRUNED)
    assert [(m.key, m.value) for m in summary._metrics(s) if m.key == "best_nll"] == [
        ("best_nll", 25.0)
    ]
    assert "trial 0: 25.00" in summary.best_lines(s)[1]
    assert [p.name for p in summary.pictures(s, tmp_path, {})] == ["history.png"]
