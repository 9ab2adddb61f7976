"""tune.yaml read against params.yaml, and what each dimension suggests (through Optuna)."""

import optuna
import pytest
from helpers import ROOT, params_dict

from vaepipe.errors import ConfigError
from vaepipe.tuning import space

SPACE = {
    "study": "s",
    "space": {
        "train.lr": {"low": 1.0e-4, "high": 0.01, "log": True},
        "model.latent_dim": {"low": 8, "high": 64, "step": 8},
        "model.hidden": {"choices": [[512, 256], [64]]},
    },
}


def test_the_default_search_space_is_valid_against_params_yaml():
    cfg = space.load(ROOT / "tune.yaml", ROOT / "params.yaml")
    assert cfg.directions == ["minimize"] and cfg.prunes and cfg.pruning.min_epochs >= 40


def test_each_dimension_suggests_values_params_yaml_takes():
    cfg = space.parse(space.DEFAULT_FILE, SPACE, params_dict())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = {d.key: d.suggest(trial) for d in cfg.space}
        assert 1e-4 <= values["train.lr"] <= 0.01 and values["model.latent_dim"] % 8 == 0
        assert values["model.hidden"] in ([512, 256], [64])  # a list again, not its text
        study.tell(trial, 0.0)


def test_multi_objective_turns_pruning_off():
    cfg = space.parse(space.DEFAULT_FILE, {**SPACE, "with_train_seconds": True}, params_dict())
    assert cfg.directions == ["minimize", "minimize"] and not cfg.prunes


@pytest.mark.parametrize(
    "change, message",
    [
        ({"space": {"model.latentdim": {"low": 2, "high": 4}}}, "did you mean model.latent_dim"),
        ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "low 0.1 must be below high"),
        ({"space": {"train.lr": {"low": 0.1}}}, "needs low and high"),
        ({"space": {"train.lr": {"low": "a", "high": 1}}}, "low must be a number"),
        ({"space": {"train.lr": {"choices": []}}}, "choices must be a non-empty list"),
        ({"space": {"train.lr": [1, 2]}}, "must be a mapping"),
        ({"space": {}}, "space must map"),
        ({"sampler": "grid"}, "sampler must be one of"),
        ({"objective": "train"}, "objective must be one of"),
        ({"extra": 1}, "unknown key(s) ['extra']"),
        ({"heartbeat_seconds": True}, "heartbeat_seconds must be a positive number"),
    ],
)
def test_a_bad_search_space_names_what_is_wrong(change, message):
    with pytest.raises(ConfigError) as e:
        space.parse(space.DEFAULT_FILE, {**SPACE, **change}, params_dict())
    assert message in str(e.value) and str(e.value).startswith("tune.yaml: ")


def test_a_float_param_with_whole_bounds_is_searched_as_floats():
    beta = {**SPACE, "space": {"train.beta": {"low": 1, "high": 4}}}
    cfg = space.parse(space.DEFAULT_FILE, beta, params_dict())
    values = {cfg.space[0].suggest(optuna.trial.FixedTrial({"train.beta": 2.5}))}
    assert values == {2.5} and isinstance(cfg.space[0].low, float)


def test_enqueued_params_are_checked_and_taken_as_optuna_takes_them():
    first = {"model.hidden": [64], "train.lr": 0.001}
    cfg = space.parse(space.DEFAULT_FILE, {**SPACE, "enqueue": [first]}, params_dict())
    assert cfg.enqueue == ({"model.hidden": "[64]", "train.lr": 0.001},)
    study = optuna.create_study()
    study.enqueue_trial(cfg.enqueue[0])
    trial = study.ask()
    assert {d.key: d.suggest(trial) for d in cfg.space}["model.hidden"] == [64]
    for bad in ({"train.lr": 0.5}, {"model.hidden": [7]}, {"train.epochs": 3}):
        with pytest.raises(ConfigError, match="outside its space|not in the space"):
            space.parse(space.DEFAULT_FILE, {**SPACE, "enqueue": [bad]}, params_dict())
