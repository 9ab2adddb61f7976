"""The MLflow model of decoder.onnx: checked payloads in-process, and a real served endpoint."""

import numpy as np
import pytest
from helpers import TINY_LATENT, decoder_signature

from vaepipe.inference import runtime, serving
from vaepipe.tracking import registry

LATENT = TINY_LATENT


@pytest.fixture(scope="module")
def decoder(tiny_decoder):
    return tiny_decoder


@pytest.fixture(scope="module")
def saved(decoder, tmp_path_factory):
    import mlflow.pyfunc

    feeds, signature = decoder_signature(decoder)
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
    assert flavors["python_function"]["loader_module"] == "vaepipe.inference.serving"
    assert flavors["python_function"]["config"]["max_batch"] == 8
    assert flavors["onnx"]["providers"] == [runtime.CPU]
    assert (
        path / "code" / "vaepipe" / "inference" / "serving.py"
    ).is_file()  # travels with the model
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
