"""The MLflow model of decoder.onnx: checked payloads in-process, and a real served endpoint."""

import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from _project import served, vae_cfg

from vaepipe import export, runtime, serving
from vaepipe.model import VAE
from vaepipe.tracking import registry

LATENT = 3


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=LATENT, hidden=[16])).eval()
    out = tmp_path_factory.mktemp("onnx")
    return export.export_models(vae, out, opset=18, metadata={"dataset": "digits"})["decoder"]


def _signature(path):
    from mlflow.models import infer_signature

    z = np.random.default_rng(0).standard_normal((2, LATENT), dtype=np.float32)
    x = runtime.open_session(path, "cpu").run({"z": z})[0]
    return {"z": z}, infer_signature({"z": z}, {"x_mean": x})


@pytest.fixture(scope="module")
def saved(decoder, tmp_path_factory):
    import mlflow.pyfunc

    feeds, signature = _signature(decoder)
    path = tmp_path_factory.mktemp("saved") / "model"
    registry.save_model(
        str(path),
        onnx_path=decoder,
        serve_config={"max_batch": 8},
        signature=signature,
        onnx_execution_providers=[runtime.CPU],
    )
    return path, mlflow.pyfunc.load_model(str(path))


def test_saved_model_is_onnx_with_a_checked_pyfunc(saved):
    import mlflow.onnx
    from mlflow.models import Model

    path, model = saved
    flavors = Model.load(str(path / "MLmodel")).flavors
    assert flavors["python_function"]["loader_module"] == "vaepipe.serving"
    assert flavors["python_function"]["config"]["max_batch"] == 8
    assert flavors["onnx"]["providers"] == [runtime.CPU]
    assert (path / "code" / "vaepipe" / "serving.py").is_file()  # travels with the model
    proto = mlflow.onnx.load_model(str(path))
    assert [i.name for i in proto.graph.input] == ["z"]
    out = model.predict(np.zeros((2, LATENT), np.float32))
    assert list(out) == ["x_mean"] and out["x_mean"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (np.full((1, LATENT), np.nan, np.float32), "NaN or infinite"),
        (np.full((1, LATENT), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((9, LATENT), np.float32), "9 rows, more than the limit of 8"),
    ],
)
def test_bad_payloads_raise_short_messages(saved, payload, message):
    from mlflow.exceptions import MlflowException

    _, model = saved
    with pytest.raises(MlflowException, match=message) as info:
        model.predict(payload)
    assert info.value.get_http_status_code() == 400
    info.value.message = "Failed to predict data '<whole input>'"  # what the server does
    assert info.value.message.startswith("input '")


def test_non_finite_outputs_are_refused(decoder, monkeypatch):
    from mlflow.exceptions import MlflowException

    model = serving.OnnxVaeModel(decoder, {"provider": "cpu"})
    monkeypatch.setattr(model.session, "run", lambda feeds: [np.full((1, 1, 8, 8), np.nan)])
    with pytest.raises(MlflowException, match="output 'x_mean' overflowed to NaN/inf"):
        model.predict(np.zeros((1, LATENT), np.float32))


# --- the real thing: registry + `mlflow models serve` on 127.0.0.1 ------------------------------


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(decoder, tmp_path_factory):
    """vae-decoder logged to a run in a tmp sqlite store, registered, served on 127.0.0.1."""
    import mlflow

    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("serving", artifact_location=(store / "art").as_uri())
        feeds, signature = _signature(decoder)
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
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert info.registered_model_version == 1 and version.run_id == run.info.run_id

    # what a deployment serves: the alias vaepipe promote moves, never "latest"
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias("vae-decoder", "champion", "1")
    with served("models:/vae-decoder@champion", uri, store / "serve.log") as url:
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
}


@pytest.mark.slow
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
