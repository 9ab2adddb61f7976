"""Plain functions the tests share: the project's params as configs (params.yaml is the one
source of defaults, here too), commands run in a project copy, and tiny data. Set-up that has
a lifetime (project copies, a pipeline run, servers) is a fixture in conftest.py."""

import atexit
import contextlib
import copy
import dataclasses
import fcntl
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sandbox
import yaml

from vaepipe import config
from vaepipe.model.vae import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
# The per-epoch MLflow metric names (docs/metrics.md); `lr` too where a schedule changes it.
PER_EPOCH_METRICS = (
    "loss/train",
    "recon/train",
    "kl/train",
    "elbo/train",
    "recon/val",
    "kl/val",
    "elbo/val",
    "beta",
    "best_epoch",
)
# One torch thread in every stage (train.threads 0 would take both cores): the suite runs four
# workers on two cores, where a stage's second thread only waits for a core.
TINY = {
    "data.dataset": "digits",
    "model.hidden": [32],
    "model.latent_dim": 4,
    "train.epochs": 3,
    "train.batch_size": 64,
    "train.threads": 1,
    "evaluate.iwae_k": 8,
}
TINY_LATENT = 3  # latent dims of conftest's tiny_decoder
# The shared pipeline run of conftest.py: TINY params and training long enough (a few seconds on
# digits) to interrupt in the middle of it; pictures at epochs 1, 20 and 40.
PIPELINE_EPOCHS = 40
PIPELINE = {
    **TINY,
    "train.epochs": PIPELINE_EPOCHS,
    "train.batch_size": 16,
    "model.hidden": [64],
    "train.image_every": 20,
}


# --- params: params.yaml is the one source of defaults, in the tests too ------------------------


@functools.cache
def _params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def params_dict(overrides=None):
    """params.yaml's mapping with `overrides` ({section: {key: value}}) laid over it; anything
    that is not a mapping replaces what it overrides, so bad shapes reach the validation."""

    def merge(base, top):
        if not isinstance(base, dict) or not isinstance(top, dict):
            return copy.deepcopy(top)
        out = copy.deepcopy(base)
        for k, v in top.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out

    return merge(_params_yaml(), {} if overrides is None else overrides)


def params(**sections) -> config.Params:
    """Validated Params: params.yaml with per-section overrides, e.g. params(train={...})."""
    return config.from_dict(params_dict(sections))


def train_cfg(**overrides) -> config.TrainConfig:
    return dataclasses.replace(params().train, **overrides)


def data_cfg(**overrides) -> config.DataConfig:
    return dataclasses.replace(params().data, **overrides)


def vae_cfg(image_shape=(1, 8, 8), n_classes: int = 0, n_train: int = 0, **overrides) -> VAEConfig:
    """params.yaml's model section (hidden, latent_dim, ... overridable) for images of
    `image_shape` (n_classes labels, for a conditional model; n_train training images, the
    exemplars of prior exemplar)."""
    model = dataclasses.replace(params().model, **overrides)
    return VAEConfig.from_params(image_shape, model, n_classes, n_train)


# --- a project copy ----------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


@contextlib.contextmanager
def default_store(uri: str):
    """MLflow's process-wide store set to `uri` for the block, whatever an earlier test in this
    process set (MLFLOW_TRACKING_URI alone loses to mlflow.set_tracking_uri): a models:/ source
    resolves through it."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def sh(cwd, *args, check=True, env=None, timeout=600):
    proc = subprocess.run(
        args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, **overrides):
    sandbox.set_params(repo, overrides)


def make_project(repo: Path, tiny: bool = True, fresh: bool = False, **overrides) -> Path:
    """The pipeline in `repo` as a fresh git repo with tiny params (TINY, unless tiny=False)
    and the overrides; conftest's `new_project` fixture makes one in a temp dir.

    Unless fresh, the project also holds what `dvc repro classifier` leaves with TINY params
    (prepared data, classifier, their dvc.lock entries and DVC cache), as a project does once
    its data is prepared: DVC reruns those two stages when the data or classifier params (or
    their code) differ, and skips them otherwise. A fresh project has run no stage."""
    sandbox.copy_project(repo, {**(TINY if tiny else {}), **overrides}, "init")
    if not fresh:
        _seed_prepared(repo)
    return repo


# what `dvc repro classifier` adds to a project: its outputs, dvc.lock, the .gitignore files it
# writes (DVC stages them, core.autostage) and the cache
PREPARED_STAGED = ("dvc.lock", ".dvc/.gitignore", "data/.gitignore", "models/.gitignore")
PREPARED_FILES = ("data/prepared", "models/classifier.pt", "metrics/classifier.json", ".dvc/cache")


# Where the prepared template lives when test processes share one: conftest points it into the
# temp folder of a pytest-xdist run, which all its workers see and pytest cleans.
SHARED_TEMPLATE: Path | None = None


@functools.cache
def _prepared_template() -> Path:
    """A TINY project after `dvc repro classifier`: built once per pytest-xdist run by the first
    worker that needs it (the others wait on a lock), or once per process (removed at exit)."""
    if SHARED_TEMPLATE is None:
        root = Path(tempfile.mkdtemp(prefix="vaepipe-prepared-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        return _build_template(root / "project")
    SHARED_TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARED_TEMPLATE.with_name(SHARED_TEMPLATE.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not SHARED_TEMPLATE.is_dir():  # built aside, then renamed: whole or absent
            building = _build_template(SHARED_TEMPLATE.with_name(f"building-{os.getpid()}"))
            building.rename(SHARED_TEMPLATE)
    return SHARED_TEMPLATE


def _build_template(repo: Path) -> Path:
    sandbox.copy_project(repo, TINY, "init")
    sh(repo, "dvc", "repro", "classifier")
    return repo


def _seed_prepared(repo: Path) -> None:
    template = _prepared_template()
    for name in PREPARED_STAGED + PREPARED_FILES:
        src, dest = template / name, repo / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
    sh(repo, "git", "add", *PREPARED_STAGED)


def proto_data(n: int = 600, seed: int = 0):
    """(train, val) float images [N, 1, 8, 8]: noisy copies of 4 random prototypes, val the
    last 100: a tiny set a VAE learns in a few epochs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 1, 8, 8, generator=g)
    x = protos[torch.randint(0, 4, (n,), generator=g)] * 0.9 + 0.05
    return x[: n - 100], x[n - 100 :]


free_port = sandbox.free_port


def decoder_signature(path: Path):
    """(an input example, the MLflow signature) of a decoder.onnx, from a run of it."""
    import numpy as np
    from mlflow.models import infer_signature

    from vaepipe.inference import runtime

    sess = runtime.open_session(path, "cpu")
    z = np.random.default_rng(0).standard_normal((2, sess.input_shape()[1]), dtype=np.float32)
    x = sess.run({"z": z})[0]
    return {"z": z}, infer_signature({"z": z}, {"x_mean": x})


def fake_ort_web(tmp: Path) -> Path:
    """Stand-ins for onnxruntime-web's files (the dist/ folder `vaepipe site` copies): what the
    build copies, not what a browser runs."""
    from vaepipe.inference import site

    dist = tmp / "onnxruntime-web" / "dist"
    dist.mkdir(parents=True)
    for name in site.RUNTIME_FILES:
        (dist / name).write_text("// stand-in\n")
    (dist.parent / "package.json").write_text('{"version": "0.0.0-test"}')
    return dist


# A tiny search for the `vaepipe tune` tests: the first two trials are enqueued (a good and a
# hopeless learning rate, so the median pruner stops the second at epoch 2), then TPE.
TINY_STUDY = {
    "study": "tiny",
    "trials": 3,
    "seed": 0,
    "heartbeat_seconds": 2,
    "pruning": {"min_epochs": 2, "startup_trials": 1},
    "enqueue": [{"train.lr": 0.01}, {"train.lr": 1.0e-6}],
    "space": {
        "train.lr": {"low": 1.0e-6, "high": 0.02, "log": True},
        "model.latent_dim": {"low": 2, "high": 6},
    },
}


def tune_project(repo: Path, tune: dict | None = None, ran=True, env=None, **overrides) -> Path:
    """make_project (6 epochs) with a committed tune.yaml (TINY_STUDY unless given), and, as
    before a real search, the pipeline run once with its dvc.lock committed (unless ran=False)."""
    make_project(repo, **{"train.epochs": 6, **overrides})
    (repo / "tune.yaml").write_text(yaml.safe_dump(tune or TINY_STUDY, sort_keys=False))
    sh(repo, "git", "add", "tune.yaml")
    if ran:
        sh(repo, "dvc", "repro", env=env, timeout=900)
        sh(repo, "git", "add", "dvc.lock")
    sh(repo, "git", "commit", "-qm", "tune.yaml")
    return repo


def trial_states(storage: str, study: str) -> list[tuple[int, str]]:
    """(number, state) of each trial of the study, from its database."""
    import optuna

    trials = optuna.load_study(study_name=study, storage=storage).trials
    return [(t.number, t.state.name) for t in trials]


# --- DVC experiment queues ----------------------------------------------------------------------


def queue_states(repo: Path, env=None) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed | ...} of `dvc queue status`."""
    out = sh(repo, "dvc", "queue", "status", env=env, timeout=120).stdout
    states = {}
    for line in out.splitlines():
        parts = line.split()  # task id, name, created (time, AM/PM), status
        if len(parts) == 5 and re.fullmatch(r"[0-9a-f]{7,}", parts[0]):
            states[parts[1]] = parts[-1]
    return states


def experiment_running(repo: Path) -> bool:
    """Whether a live process works in repo/.dvc/tmp/exps, where queued experiments run: a
    look at /proc, where `dvc queue status` costs a second of CPU that the experiments need."""
    exps = repo / ".dvc" / "tmp" / "exps"
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if p.name.isdigit() and Path(os.readlink(p / "cwd")).is_relative_to(exps):
                if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
    return False


def wait_queue(repo: Path, env=None, timeout: float = 900) -> dict[str, str]:
    """The queue's final states once nothing is Queued or Running; on a timeout the assertion
    names each experiment's state. `dvc queue status` is asked only while no experiment runs."""
    deadline, states = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        if experiment_running(repo):
            time.sleep(1)
            continue
        states = queue_states(repo, env)
        if not any(s in ("Queued", "Running") for s in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"the DVC queue of {repo} still busy after {timeout:.0f} s: {states}")
