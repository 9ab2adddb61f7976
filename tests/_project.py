"""Helpers for the tests: the project's params as configs, and a temp git repo holding a copy of
the project for tests that run the real pipeline."""

import contextlib
import copy
import dataclasses
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from vaepipe import config
from vaepipe.model import VAEConfig

ROOT = Path(__file__).resolve().parents[1]
# The per-epoch MLflow metric names of DESIGN.md.
PER_EPOCH_METRICS = (
    "train/loss",
    "train/recon",
    "train/kl",
    "train/elbo",
    "val/recon",
    "val/kl",
    "val/elbo",
    "beta",
    "lr",
)
TINY = {
    "data.dataset": "digits",
    "model.hidden": [32],
    "model.latent_dim": 4,
    "train.epochs": 3,
    "train.batch_size": 64,
    "evaluate.iwae_k": 8,
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


def vae_cfg(image_shape=(1, 8, 8), n_classes: int = 0, **overrides) -> VAEConfig:
    """params.yaml's model section (hidden, latent_dim, ... overridable) for images of
    `image_shape` (and n_classes labels, for a conditional model)."""
    model = dataclasses.replace(params().model, **overrides)
    return VAEConfig.from_params(image_shape, model, n_classes)


# --- a project copy ----------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def sh(cwd, *args, check=True, env=None, timeout=600):
    proc = subprocess.run(
        args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def set_params(repo: Path, **overrides):
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params))


def make_project(repo: Path, tiny: bool = True, **overrides) -> Path:
    """Copy the pipeline into `repo`, set tiny params (TINY, unless tiny=False) and the
    overrides, and commit it as a fresh git repo."""
    for name in ("pipeline", "src"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "data/raw/README.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    set_params(repo, **{**(TINY if tiny else {}), **overrides})
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    # an identity of its own: a fresh machine (CI, a GPU box) may have none configured
    sh(
        repo,
        "git",
        "-c",
        "user.name=vaepipe",
        "-c",
        "user.email=vaepipe@localhost",
        "commit",
        "-qm",
        "init",
    )
    return repo


def proto_data(n: int = 600, seed: int = 0):
    """(train, val) float images [N, 1, 8, 8]: noisy copies of 4 random prototypes, val the
    last 100: a tiny set a VAE learns in a few epochs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 1, 8, 8, generator=g)
    x = protos[torch.randint(0, 4, (n,), generator=g)] * 0.9 + 0.05
    return x[: n - 100], x[n - 100 :]


# --- a served model ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, log: Path, extra_env: dict | None = None):
    """`mlflow models serve -m model_uri` on 127.0.0.1 (a free port), up within 90 s; yields
    its /invocations URL. Stopped by process group at the end: uvicorn survives its parent."""
    port = free_port()
    env = {**clean_env(MLFLOW_TRACKING_URI=tracking_uri), **(extra_env or {})}
    cmd = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/ping", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"mlflow models serve {model_uri} did not come up:\n{log.read_text()}"
                    ) from None
                time.sleep(0.5)
        yield url + "/invocations"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
