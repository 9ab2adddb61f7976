"""A registered decoder served by `mlflow models serve` on 127.0.0.1 from a sqlite store: it
answers, and every bad payload is an HTTP 400 with a short message while it keeps serving."""

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import TINY_LATENT, decoder_signature, default_store

from vaepipe.inference import runtime
from vaepipe.tracking import registry

LATENT = TINY_LATENT


@pytest.fixture(scope="module")
def decoder(tiny_decoder):
    return tiny_decoder


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(decoder, tmp_path_factory, serve):
    """vae-decoder logged to a run in a tmp sqlite store, registered, served on 127.0.0.1."""
    import mlflow

    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with default_store(uri):
        exp = mlflow.create_experiment("serving", artifact_location=(store / "art").as_uri())
        feeds, signature = decoder_signature(decoder)
        with mlflow.start_run(experiment_id=exp) as run:
            info = registry.log_model(
                decoder,
                "decoder",
                registered_model_name="vae-decoder",
                serve_config={"max_batch": 1000},
                signature=signature,
                input_example=feeds,
                onnx_execution_providers=[runtime.CPU],
            )
        version = mlflow.MlflowClient().get_model_version("vae-decoder", "1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert info.registered_model_version == 1 and version.run_id == run.info.run_id

    # what a deployment serves: the alias vaepipe promote moves, never "latest"
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias("vae-decoder", "champion", "1")
    with serve("models:/vae-decoder@champion", uri, store / "serve.log") as url:
        yield url, store / "serve.log"


def _row(value=0.1, width=LATENT):
    return [value] * width


BAD_PAYLOADS = {
    "wrong width": (json.dumps({"inputs": [_row(width=5)]}), "shape"),
    "NaN": ('{"inputs": [[NaN, 0.1, 0.1]]}', "NaN or infinite"),
    "Infinity": ('{"inputs": [[0.1, Infinity, 0.1]]}', "NaN or infinite"),
    "strings": (json.dumps({"inputs": [["a", "b", "c"]]}), "could not convert string"),
    "empty": (json.dumps({"inputs": []}), "shape"),
    "empty row": (json.dumps({"inputs": [[]]}), "shape"),
    "ragged": (json.dumps({"inputs": [_row(), [0.1]]}), "inhomogeneous"),
    "no inputs": (json.dumps({"rows": [_row()]}), "input must be a JSON dictionary"),
    "not json": ("hello", "valid JSON"),
    "huge batch": (json.dumps({"inputs": [_row()] * 20_000}), "more than the limit of 1000"),
    "wrong name": (json.dumps({"inputs": {"x": [_row()]}}), ""),
    "booleans": (json.dumps({"inputs": [[True] * LATENT]}), "true/false"),
    "nested 2,000 deep": ('{"inputs": ' + "[" * 2000 + "]" * 2000 + "}", "nested too deeply"),
    "5,001-digit integer": ('{"inputs": [[' + "9" * 5001 + "]]}", "cannot be parsed"),
}


def test_served_decoder_answers_and_survives_bad_payloads(server, decoder):
    url, log = server
    z = np.random.default_rng(1).standard_normal((2, LATENT)).astype(np.float32)
    status, body = _post(url, json.dumps({"inputs": z.tolist()}).encode())
    assert status == 200, body
    expected = runtime.open_session(decoder, "cpu").run({"z": z})[0]
    np.testing.assert_allclose(np.array(body["predictions"]["x_mean"]), expected, atol=1e-6)

    for name, (payload, message) in BAD_PAYLOADS.items():
        status, body = _post(url, payload.encode())
        assert 400 <= status < 500, (name, status, body)
        assert message in body["message"], (name, body)
        assert len(body["message"]) < 2000, (name, "the message echoes the payload")
        assert "stack_trace" not in body, name
        # and the server keeps serving
        assert _post(url, json.dumps({"inputs": [_row()]}).encode())[0] == 200, name
    assert "CPUExecutionProvider" in log.read_text()  # the provider that runs, reported


# The last commit of the flat package layout, whose registered models name `vaepipe.serving`
FLAT_LAYOUT_COMMIT = "f0143ad"
REGISTER_WITH_OLD_CODE = """
import numpy as np, torch, mlflow
from pathlib import Path
from mlflow.models import infer_signature
from vaepipe import export, runtime
from vaepipe.model import VAE, VAEConfig
from vaepipe.tracking import registry

assert "{old}" in __import__("vaepipe").__file__
cfg = VAEConfig(
    image_shape=(1, 8, 8), latent_dim=3, hidden=[16], likelihood="bernoulli",
    gaussian_sigma=0.1, arch="mlp", channels=[], learn_sigma=False, min_sigma=0.01,
    prior="standard", prior_components=1, z1_dim=1, conditional=False, activation="relu",
)
torch.manual_seed(0)
vae = VAE(cfg).eval()
decoder = export.export_models(vae, Path("{out}"), opset=18, metadata={{"dataset": "digits"}})
z = np.zeros((2, 3), np.float32)
x = runtime.open_session(decoder["decoder"], "cpu").run({{"z": z}})[0]
mlflow.set_tracking_uri("{uri}")
exp = mlflow.create_experiment("flat", artifact_location="{art}")
with mlflow.start_run(experiment_id=exp):
    registry.log_model(
        decoder["decoder"], "decoder", registered_model_name="vae-decoder",
        serve_config={{"max_batch": 10}}, signature=infer_signature({{"z": z}}, {{"x_mean": x}}),
        input_example={{"z": z}}, onnx_execution_providers=[runtime.CPU],
    )
"""


def test_a_model_registered_by_the_flat_layout_still_serves(tmp_path, serve):
    """Models registered before the package had layers name `vaepipe.serving` as their loader;
    they load through their own copy of the package, served with today's code installed."""
    import subprocess
    import sys

    from helpers import ROOT, clean_env

    if subprocess.run(
        ["git", "cat-file", "-e", FLAT_LAYOUT_COMMIT], cwd=ROOT, capture_output=True
    ).returncode:
        pytest.skip(f"this checkout has no commit {FLAT_LAYOUT_COMMIT} (a shallow clone)")
    old = tmp_path / "old"
    archive = subprocess.run(
        ["git", "archive", FLAT_LAYOUT_COMMIT, "src"], cwd=ROOT, capture_output=True, check=True
    )
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = REGISTER_WITH_OLD_CODE.format(
        old=old / "src", out=tmp_path / "onnx", uri=uri, art=(tmp_path / "art").as_uri()
    )
    env = clean_env(PYTHONPATH=str(old / "src"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (mlmodel,) = (tmp_path / "art").rglob("MLmodel")
    assert "loader_module: vaepipe.serving" in mlmodel.read_text()
    with serve("models:/vae-decoder/1", uri, tmp_path / "serve.log") as url:
        status, body = _post(url, json.dumps({"inputs": [[0.0, 0.0, 0.0]]}).encode())
        assert status == 200 and np.array(body["predictions"]["x_mean"]).shape == (1, 1, 8, 8)
        status, body = _post(url, b'{"inputs": [[NaN, 0.0, 0.0]]}')
        assert status == 400 and "NaN" in body["message"]
