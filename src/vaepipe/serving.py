"""An MLflow model flavour for encoder.onnx / decoder.onnx that checks what it is served.

`mlflow.onnx` alone passes NaN through, echoes whole inputs in its errors and computes any batch
it is sent. Here the saved model is an ordinary ONNX-flavour model (`mlflow.onnx.load_model` and
the raw model.onnx still work) whose python_function flavour loads through this module instead:
an onnxruntime session opened by vaepipe.runtime (provider policy, provider reported), with each
payload checked before it runs. A bad payload is an HTTP 400 with a short message naming the
problem; the server keeps serving. The vaepipe package travels with the model (code_paths).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from vaepipe import runtime

MLMODEL = "MLmodel"
# Served limits; model_config keys, overridable at load time (mlflow.pyfunc.load_model).
DEFAULT_CONFIG = {"provider": "auto", "max_batch": 4096, "value_range": None}


def _payload_error(message: str):
    """An MlflowException (HTTP 400) whose message the scoring server cannot prefix.

    The server rewrites `e.message` to "Failed to predict data '<the whole input>'..."; for a
    4096 x 784 encoder payload that is megabytes of echo, so this one keeps its own message.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class PayloadError(MlflowException):
        @property
        def message(self) -> str:
            return self._vaepipe_message

        @message.setter
        def message(self, value: str) -> None:
            if not hasattr(self, "_vaepipe_message"):
                self._vaepipe_message = value

    return PayloadError(message, error_code=INVALID_PARAMETER_VALUE)


class OnnxVaeModel:
    """What mlflow.pyfunc wraps: predict(payload) -> {output name: array}."""

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None):
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        policy = os.environ.get("VAEPIPE_PROVIDER") or self.config["provider"]
        self.session = runtime.open_session(path, policy)
        s = self.session
        print(
            f"vaepipe: model {s.input_name} -> {', '.join(s.output_names)} loaded on "
            f"{s.provider} ({s.reason}); at most {self.config['max_batch']} rows per request",
            file=sys.stderr,
            flush=True,
        )

    def _array(self, data):
        name = self.session.input_name
        if isinstance(data, dict):
            if name not in data:
                raise runtime.InferenceInputError(
                    f"payload names inputs {sorted(data)}; this model takes one input '{name}'"
                )
            data = data[name]
        elif hasattr(data, "to_numpy"):  # a pandas DataFrame from dataframe_split/records
            data = data.to_numpy()
        return data

    def predict(self, data, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        try:
            x = self.session.check(
                self._array(data),
                value_range=self.config["value_range"],
                max_batch=self.config["max_batch"],
            )
            s = self.session
            outputs = dict(zip(s.output_names, s.run({s.input_name: x}), strict=True))
            for name, out in outputs.items():
                if not np.isfinite(out).all():
                    raise runtime.InferenceInputError(
                        f"output '{name}' overflowed to NaN/inf: the input values are too large "
                        f"in magnitude for this model"
                    )
        except runtime.InferenceInputError as e:
            raise _payload_error(str(e)) from None
        return outputs


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> OnnxVaeModel:
    """mlflow.pyfunc's entry point: `data_path` is the model's model.onnx."""
    return OnnxVaeModel(data_path, model_config)


def _requirements() -> list[str]:
    reqs = []
    for dist in ("mlflow", "onnx", "numpy"):
        reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
    for dist in ("onnxruntime-gpu", "onnxruntime"):  # whichever build this environment runs
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
            break
        except importlib_metadata.PackageNotFoundError:
            continue
    return reqs


def save_model(
    path: str,
    mlflow_model=None,
    *,
    onnx_path: str | Path,
    serve_config: dict[str, Any] | None = None,
    **onnx_kwargs,
) -> None:
    """mlflow.onnx.save_model, then point python_function at this module (called by Model.log)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    onnx_kwargs.setdefault("pip_requirements", _requirements())
    mlflow.onnx.save_model(
        onnx.load(str(onnx_path)),
        path,
        mlflow_model=mlflow_model,
        code_paths=[str(Path(__file__).parent)],
        save_as_external_data=False,  # one self-contained model.onnx, as the stage writes it
        **onnx_kwargs,
    )
    from mlflow.pyfunc import MODEL_CONFIG

    conf = mlflow_model.flavors["python_function"]
    conf["loader_module"] = __name__
    conf[MODEL_CONFIG] = {**DEFAULT_CONFIG, **(serve_config or {})}
    mlflow_model.save(os.path.join(path, MLMODEL))


def log_model(
    onnx_path: str | Path,
    name: str,
    *,
    registered_model_name: str | None = None,
    serve_config: dict[str, Any] | None = None,
    **onnx_kwargs,
):
    """Log (and register, given a name) an ONNX graph with the checked pyfunc; ModelInfo.

    `serve_config` (DEFAULT_CONFIG's keys) becomes the pyfunc model_config; it is not passed as
    `model_config`, which Model.log would also write into the run's params.
    """
    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        flavor_name="onnx",
        registered_model_name=registered_model_name or None,
        onnx_path=onnx_path,
        serve_config=serve_config,
        **onnx_kwargs,
    )
