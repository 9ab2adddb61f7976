"""Set-up the tiers share, as fixtures: a tiny model, fresh project copies (a temp git repo
holding the pipeline), one tiny `dvc repro` per test process that the end-to-end tests read,
and `mlflow models serve` on 127.0.0.1, stopped by its process group.

tests/unit: the library in-process (`make check`, the edit loop); tests/e2e: `dvc repro`, the
`vaepipe` command and served models on tiny data; tests/stack: real PostgreSQL, S3 store,
MLflow server and browser. `make test` runs all three.
"""

import os
import signal
from pathlib import Path

# A shell without job control starts a background job (`make test &`) with SIGINT ignored, and
# every process it starts inherits that: the tests that send SIGINT to a stage would then see
# nothing happen. Ctrl-C's default here, so this process and the ones the tests start take it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Under pytest-xdist (`make check`, `make test`) the workers share the cores: one thread each
# for torch, the BLAS and onnxruntime, in the worker and in the processes its tests start,
# rather than a pool per worker fighting for the same cores (measured: the same tests take
# less than half the time). Set before torch and numpy load their thread pools.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("VAEPIPE_ORT_THREADS", "1")

import helpers  # noqa: E402
import pytest  # noqa: E402
import sandbox  # noqa: E402
import torch  # noqa: E402
from helpers import PIPELINE, TINY_LATENT, clean_env, make_project, sh, vae_cfg

from vaepipe.model.vae import VAE  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import threadpoolctl

    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)  # numpy may have loaded its BLAS already

# How `make test` spreads the tests over pytest-xdist workers (--dist loadscope, with the scopes
# below): a module runs whole on one worker, in order, so its module fixtures are set up once;
# the modules that read the shared tiny pipeline run share a worker, and so that one run. (The
# team-stack modules too run whole: a worker sets up their stack once, and each test that stops
# a part of it starts it again.)
SHARED_PIPELINE_RUN = (
    "tests/e2e/test_pipeline.py",
    "tests/e2e/test_probe.py",
    "tests/e2e/test_resume.py",
)
# Longest first: a worker that takes a long scope late keeps the suite waiting alone at the
# end. Seconds of each slow module under `make test` (pytest --durations=0, setup included);
# any other module counts a second per test.
SECONDS = {
    "tests/e2e/test_interrupts.py": 680,
    "tests/stack/test_team_faults.py": 620,
    "tests/e2e/test_promote.py": 410,
    "tests/e2e/test_training_options.py": 390,
    "tests/e2e/test_registration.py": 380,
    "tests/e2e/test_tune.py": 350,
    "tests/stack/test_team_machines.py": 330,
    "tests/stack/test_tune_team.py": 220,
    "tests/e2e/test_experiments.py": 200,
    "tests/stack/test_team.py": 190,
    "tests/e2e/test_distributed.py": 180,
    "tests/unit/test_priors.py": 120,
    "tests/e2e/test_model_options.py": 110,
    "tests/stack/test_mlflow_server.py": 100,
    "tests/unit/test_compare.py": 75,
    "tests/stack/test_site_rebuild.py": 65,
    "tests/e2e/test_served_model.py": 50,
    "tests/stack/test_site.py": 50,
    "tests/unit/test_scorer.py": 45,
    "tests/stack/test_dvc_plots.py": 40,
    "tests/e2e/test_store_faults.py": 35,
    "tests/e2e/test_packaging.py": 25,
    "tests/unit/test_export_graphs.py": 25,
}
SECONDS["shared pipeline run"] = 370  # test_pipeline, test_probe and test_resume


def scope_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    if module in SHARED_PIPELINE_RUN:
        return "shared pipeline run"
    return module


def pytest_collection_modifyitems(config, items):
    """Scopes longest first, each in its own order (xdist hands them out in collection order)."""
    scopes: dict[str, list] = {}
    for item in items:
        scopes.setdefault(scope_of(item.nodeid), []).append(item)

    def seconds(scope: str) -> float:
        return SECONDS.get(scope, len(scopes[scope]))

    order = sorted(scopes, key=seconds, reverse=True)
    items[:] = [item for scope in order for item in scopes[scope]]


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.option.loadscopereorder = False  # our order above, not xdist's (tests per scope)


@pytest.hookimpl(tryfirst=True)  # before xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

        def _reschedule(self, node) -> None:
            # A scope more only once the worker holds its last test (which it runs when it
            # knows the next one): xdist's own rule, two tests, commits a second scope to a
            # worker whose last two tests may be long while other workers go idle.
            if not node.shutting_down and self.workqueue:
                if self._pending_of(self.assigned_work[node]) > 1:
                    return
            super()._reschedule(node)

    return Scopes(config, log)


@pytest.fixture
def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])).eval()


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """decoder.onnx of a tiny 8x8 model with TINY_LATENT dims, exported with the contract."""
    from vaepipe.export import graphs

    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=TINY_LATENT, hidden=[16])).eval()
    out = tmp_path_factory.mktemp("onnx")
    return graphs.export_models(vae, out, opset=18, metadata={"dataset": "digits"})["decoder"]


@pytest.fixture(scope="session", autouse=True)
def shared_prepared_template(tmp_path_factory):
    """Under pytest-xdist, the workers of a run copy their projects' prepared data from one
    template in the run's temp folder (helpers.make_project) rather than each building its own."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        helpers.SHARED_TEMPLATE = tmp_path_factory.getbasetemp().parent / "prepared-template"


@pytest.fixture(scope="session")
def new_project(tmp_path_factory):
    """A factory of project copies: new_project(name, tiny=True, fresh=False, **overrides) ->
    a committed temp git repo with the pipeline, TINY params (unless tiny=False) and the
    overrides ({"train.epochs": 2, ...}); its data prepared unless fresh (make_project)."""

    def make(name: str = "project", tiny: bool = True, fresh: bool = False, **overrides) -> Path:
        return make_project(tmp_path_factory.mktemp(name), tiny=tiny, fresh=fresh, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_pipeline(new_project):
    """(repo, the first `dvc repro`'s process) after one tiny run of the whole pipeline (digits,
    PIPELINE params) under umask 022. Tests that change params put them back."""
    repo = new_project("pipeline", fresh=True, **PIPELINE)  # every stage runs
    previous = os.umask(0o022)  # the outputs must follow it, whatever the tests' own
    try:
        # the system-metrics sampler logs every 10 s by default: longer than this tiny run
        first = sh(
            repo, "dvc", "repro", env=clean_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")
        )
    finally:
        os.umask(previous)
    return repo, first


@pytest.fixture(scope="session")
def serve():
    """serve(model_uri, tracking_uri, log, extra_env=None): a context manager running `mlflow
    models serve -m model_uri` on 127.0.0.1 (a free port), up within 90 s, yielding its
    /invocations URL; stopped by process group at the end (uvicorn survives its parent)."""

    def serve_model(model_uri: str, tracking_uri: str, log: Path, extra_env: dict | None = None):
        env = {**clean_env(MLFLOW_TRACKING_URI=tracking_uri), **(extra_env or {})}
        return sandbox.served(model_uri, env, log)

    return serve_model
