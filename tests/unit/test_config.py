import dataclasses
import re

import pytest
import yaml
from helpers import ROOT, params_dict

from vaepipe import config
from vaepipe.errors import ConfigError
from vaepipe.model.vae import VAEConfig


def _leaf_keys(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in raw.items():
        full = f"{prefix}.{k}" if prefix else k
        keys |= _leaf_keys(v, full) if isinstance(v, dict) else {full}
    return keys


def test_params_yaml_is_the_one_source_of_every_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = config.load(ROOT / "params.yaml")
    flat = config.flatten(params)
    assert set(flat) == _leaf_keys(raw)  # no key in code that params.yaml lacks, or back
    for key in _leaf_keys(raw):
        section, name = key.split(".")
        assert flat[key] == raw[section][name], key
    # the dataclasses hold no second copy of the numbers
    for cls in config.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@pytest.mark.parametrize("key", ["train.epochs", "evaluate.batch_size", "model.hidden"])
def test_a_key_missing_from_params_yaml_is_named(key):
    raw = params_dict()
    section, name = key.split(".")
    del raw[section][name]
    with pytest.raises(ConfigError, match=rf"param '{key}' is missing; params.yaml must set"):
        config.from_dict(raw)


def test_model_config_is_built_from_the_params_field_for_field():
    model = config.load(ROOT / "params.yaml").model
    cfg = VAEConfig.from_params((1, 28, 28), model)
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    # the data's image shape, number of classes and exemplars, and the model params field for
    # field
    model_fields = {f.name for f in dataclasses.fields(config.ModelConfig)}
    assert fields == {"image_shape", "n_classes", "n_exemplars"} | model_fields
    assert cfg.to_dict() == {
        "image_shape": [1, 28, 28],
        "n_classes": 0,
        "n_exemplars": 0,
        **dataclasses.asdict(model),
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"latent_dimm": 3}}, "did you mean 'latent_dim'"),
        ({"trian": {}}, "did you mean 'train'"),
        ({"model": {"latent_dim": 0}}, "'model.latent_dim' = 0 is out of range; must be >= 1"),
        ({"model": {"latent_dim": "8"}}, "'model.latent_dim' = '8' must be an integer"),
        ({"model": {"latent_dim": True}}, "must be an integer"),
        ({"train": {"lr": 0}}, "'train.lr' = 0.0 is out of range; must be > 0"),
        ({"train": {"lr": float("nan")}}, "must be a finite number"),
        ({"data": {"val_fraction": 1.0}}, "must be > 0 and < 1"),
        ({"evaluate": {"iwae_k": 0}}, "'evaluate.iwae_k'"),
        ({"data": {"dataset": "cifar"}}, "choose one of: fashion-mnist, mnist, digits, npz"),
        ({"model": {"likelihood": "poisson"}}, "'model.likelihood'"),
        ({"export": {"provider": "tpu"}}, "'export.provider'"),
        ({"model": {"hidden": [64, 0]}}, "list of positive integers"),
        ({"model": "big"}, "'model' must be a mapping"),
        ({"data": {"binarize": "none"}}, "needs binary pixels"),
        ({"data": {"dataset": "npz"}}, "'data.npz_path'"),
        ({"evaluate": {"knn_k": 50, "probe_train_size": 50}}, "must be smaller than"),
        ({"export": {"opset": 7}}, "'export.opset' = 7 is out of range; must be >= 18 and <= 26"),
        ({"mlflow": {"experiment": " "}}, "'mlflow.experiment' = ' ' must not be empty"),
        ({"train": {"seed": 2**64}}, "'train.seed' = 18446744073709551616 is out of range"),
        (
            {"train": {"threads": 100000}},
            "'train.threads' = 100000 is out of range; must be >= 0 and <= 1024",
        ),
        ({"evaluate": {"iwae_k": 10**6}}, "must be >= 1 and <= 100000"),
        ({"train": {"lr": 10**400}}, "'train.lr' = inf must be a finite number"),
        ({"model": {10**5000: 1}}, "unknown param 'model.<an integer of 16610 bits>'"),
        ([1, 2], "the params file must be a mapping of keys, got [1, 2]"),
        ({"model": {"arch": "resnet"}}, "choose one of: mlp, conv"),
        ({"model": {"arch": "conv", "channels": []}}, "'model.channels' must list at least one"),
        ({"model": {"channels": [32, -1]}}, "'model.channels' = [32, -1] must be a list"),
        ({"model": {"likelihood": "continuous_bernoulli"}}, "set binarize none"),
        ({"model": {"learn_sigma": True}}, "needs 'model.likelihood' = 'gaussian'"),
        (
            {
                "model": {"likelihood": "gaussian", "learn_sigma": True, "min_sigma": 0.2},
                "data": {"binarize": "none"},
            },
            "'model.min_sigma' = 0.2 must be smaller than 'model.gaussian_sigma' = 0.1",
        ),
        ({"train": {"objective": "vae"}}, "choose one of: elbo, iwae"),
        ({"train": {"objective": "iwae", "beta": 0.5}}, "'train.beta' = 0.5 does not apply"),
        ({"train": {"objective": "iwae", "warmup_epochs": 5}}, "'train.warmup_epochs' = 5"),
        ({"train": {"objective": "iwae", "free_bits": 0.1}}, "'train.free_bits' = 0.1"),
        ({"train": {"iwae_k": 0}}, "'train.iwae_k' = 0 is out of range"),
        ({"train": {"free_bits": -1}}, "'train.free_bits' = -1.0 is out of range; must be >= 0"),
        ({"train": {"warmup_epochs": 2.5}}, "'train.warmup_epochs' = 2.5 must be an integer"),
        ({"train": {"lr_schedule": "cosine", "lr_min": 0.01}}, "'train.lr_min' = 0.01 must be"),
        ({"train": {"lr_schedule": "step"}}, "choose one of: constant, cosine, plateau"),
        (
            {"train": {"lr_factor": 1}},
            "'train.lr_factor' = 1.0 is out of range; must be > 0 and < 1",
        ),
        ({"train": {"early_stopping": -3}}, "'train.early_stopping' = -3 is out of range"),
        ({"evaluate": {"iwae_n": -1}}, "'evaluate.iwae_n' = -1 is out of range"),
    ],
)
def test_bad_params_name_key_value_and_allowed(raw, message):
    with pytest.raises(ConfigError, match=None) as e:
        config.from_dict(params_dict(raw))
    assert message in str(e.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_gaussian_with_grey_pixels_is_valid():
    p = config.from_dict(
        params_dict({"model": {"likelihood": "gaussian"}, "data": {"binarize": "none"}})
    )
    assert p.model.likelihood == "gaussian" and p.train.lr == 1e-3


def test_every_issue_9_option_is_reachable_together():
    p = config.from_dict(
        params_dict(
            {
                "data": {"binarize": "none"},
                "model": {
                    "arch": "conv",
                    "channels": [16, 32],
                    "likelihood": "gaussian",
                    "learn_sigma": True,
                    "min_sigma": 0.02,
                },
                "train": {
                    "warmup_epochs": 3,
                    "free_bits": 0.25,
                    "lr_schedule": "plateau",
                    "lr_min": 1e-5,
                    "early_stopping": 5,
                },
                "evaluate": {"iwae_n": 1000},
            }
        )
    )
    assert p.model.arch == "conv" and p.train.free_bits == 0.25 and p.evaluate.iwae_n == 1000
    q = config.from_dict(
        params_dict({"train": {"objective": "iwae", "iwae_k": 50, "lr_schedule": "cosine"}})
    )
    assert q.train.iwae_k == 50


@pytest.mark.parametrize(
    "train, key, value",
    [
        ({"lr_min": "1e-5", "lr_schedule": "cosine"}, "lr_min", 1e-5),
        ({"lr": "3E-4"}, "lr", 3e-4),
        ({"free_bits": "+2.5e-1"}, "free_bits", 0.25),
    ],
)
def test_exponent_floats_that_yaml_reads_as_strings_are_numbers(train, key, value):
    # YAML 1.1 (PyYAML, and so `dvc exp run -S train.lr_min=1e-5`) reads 1e-5 as a string
    assert getattr(config.from_dict(params_dict({"train": train})).train, key) == value
    with pytest.raises(ConfigError, match="'train.free_bits' = -0.25 is out of range"):
        config.from_dict(params_dict({"train": {"free_bits": "-2.5e-1"}}))


def test_words_stay_wrong_for_number_params():
    with pytest.raises(ConfigError, match="'train.lr' = 'fast' must be a number"):
        config.from_dict(params_dict({"train": {"lr": "fast"}}))
    with pytest.raises(ConfigError, match="'train.lr' = 'nan' must be a number"):
        config.from_dict(params_dict({"train": {"lr": "nan"}}))


def test_with_sets_lays_dvc_style_overrides_over_a_params_mapping():
    raw = params_dict()
    out = config.with_sets(raw, ["train.epochs=3", "model.hidden=[64, 32]", "train.lr=0.5"])
    got = (out["train"]["epochs"], out["model"]["hidden"], out["train"]["lr"])
    assert got == (3, [64, 32], 0.5)
    assert raw["train"]["epochs"] != 3  # a copy: the given mapping is left as it was
    assert config.from_dict(out).model.hidden == [64, 32]
    for item, message in [
        ("train.epochs", "expected section.key=value"),
        ("epochs=3", "expected section.key=value"),
        ("train.=3", "expected section.key=value"),
        ("nosuch.epochs=3", "with a section of params.yaml (data, model"),
        ("model.hidden=[1,", "the value is not YAML"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.with_sets(raw, [item])
