"""The served side of encoder.onnx / decoder.onnx: what `mlflow models serve` loads.

`mlflow.onnx` alone passes NaN through, echoes whole inputs in its errors and computes any batch
it is sent. The models the export stage logs (vaepipe.tracking.registry) are ordinary ONNX-flavour
models (`mlflow.onnx.load_model` and the raw model.onnx still work) whose python_function
flavour names this module as its `loader_module`: an onnxruntime session opened by
vaepipe.inference.runtime (provider policy, provider reported), with each payload checked
before it runs. A bad payload is an HTTP 400 with a short message naming the problem; the
server keeps serving. The vaepipe package travels with the model (code_paths), so models
registered earlier keep loading through their own copy of this module. Nothing in the pipeline
imports it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vaepipe.inference import runtime

# What a served model does with a model_config key it lacks (each can be overridden at load
# time: mlflow.pyfunc.load_model(uri, model_config=...)); the export stage writes max_batch
# from export.serve_max_batch and value_range from the ONNX contract.
DEFAULT_CONFIG = {"provider": "auto", "max_batch": None, "value_range": None}


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
        most = self.config["max_batch"]
        why = "" if s.reason == runtime.NO_GPU else f" ({s.reason})"  # CPU says it all there
        print(
            f"vaepipe: model {s.input_name} -> {', '.join(s.output_names)} loaded on "
            f"{s.provider}{why}; "
            + (f"at most {most} rows per request" if most else "no row limit per request"),
            file=sys.stderr,
            flush=True,
        )

    def _array(self, data):
        name = self.session.input_name
        if isinstance(data, dict):
            if name not in data:
                takes = [i.name for i in self.session.session.get_inputs()]
                raise runtime.InferenceInputError(
                    f"payload names inputs {sorted(data)}; this model takes {takes}"
                )
            data = data[name]
        elif hasattr(data, "to_numpy"):  # a pandas DataFrame from dataframe_split/records
            data = data.to_numpy()
        return data

    def _labels(self, data, rows: int) -> dict:
        """A conditional model's second input: one-hot labels y [rows, n_classes]."""
        inputs = self.session.session.get_inputs()
        if len(inputs) == 1:
            return {}
        y = inputs[1]
        if not isinstance(data, dict) or y.name not in data:
            raise runtime.InferenceInputError(
                f"this model is conditional: send {{'{inputs[0].name}': [...], '{y.name}': "
                f"[one-hot labels, {y.shape[1]} per row]}}"
            )
        labels = runtime.check_batch(
            data[y.name], y.name, (None, y.shape[1]), where="the model", value_range=(0, 1)
        )
        if len(labels) != rows:
            raise runtime.InferenceInputError(
                f"input '{y.name}' has {len(labels)} rows; '{inputs[0].name}' has {rows}"
            )
        return {y.name: labels}

    def predict(self, data, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        try:
            x = self.session.check(
                self._array(data),
                value_range=self.config["value_range"],
                max_batch=self.config["max_batch"],
            )
            s = self.session
            feeds = {s.input_name: x, **self._labels(data, len(x))}
            outputs = dict(zip(s.output_names, s.run(feeds), strict=True))
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
    _guard_scoring_server()
    return OnnxVaeModel(data_path, model_config)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BOOLEAN = re.compile(rb"\b(?:true|false)\b")


def _check_json_text(text: str | bytes) -> None:
    """JSON true/false where numbers go: MLflow's schema casts them to 1.0/0.0 silently."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if _BOOLEAN.search(_STRING.sub(b'""', raw)):
        raise _payload_error("the payload holds JSON true/false; send numbers")


def _guard_scoring_server() -> None:
    """In `mlflow models serve` (its scoring server module is loaded before the model): JSON
    that json.loads cannot take (nesting deeper than Python's recursion limit, an integer of
    more than 4300 digits) would be an HTTP 500 with a traceback, and true/false would pass as
    numbers; each is an HTTP 400 with one line instead, checked before MLflow parses."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    decode = getattr(server, "_decode_json_input", None)
    if decode is None or getattr(decode, "vaepipe_guard", False):
        return

    def guarded(json_input):
        if isinstance(json_input, str | bytes | bytearray):
            _check_json_text(json_input)
        try:
            return decode(json_input)
        except RecursionError:
            raise _payload_error("the payload's JSON is nested too deeply to parse") from None
        except ValueError as e:  # json.loads' integer limit (JSONDecodeError is handled inside)
            raise _payload_error(f"the payload's JSON cannot be parsed: {e}"[:300]) from None

    guarded.vaepipe_guard = True
    server._decode_json_input = guarded
