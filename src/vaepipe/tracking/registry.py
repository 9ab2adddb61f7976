"""Models in MLflow: ONNX graphs logged as servable models, registered and tagged.

A logged graph is an ordinary ONNX-flavour model (mlflow.onnx.load_model and the raw model.onnx
work) whose python_function flavour names `vaepipe.serving` as its loader_module, with the
serving limits as its model_config and the vaepipe package copied in (code_paths), so it loads
wherever it is served. Only the name of the serving module is needed here: editing serving.py
reruns no stage. Every call goes through vaepipe.tracking's retry policy.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from vaepipe.tracking import call

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/vaepipe, copied into every model
LOADER_MODULE = "vaepipe.serving"
MLMODEL = "MLmodel"


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
    """mlflow.onnx.save_model, then point python_function at vaepipe.serving (Model.log calls
    this through `flavor.save_model`)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    onnx_kwargs.setdefault("pip_requirements", _requirements())
    mlflow.onnx.save_model(
        onnx.load(str(onnx_path)),
        path,
        mlflow_model=mlflow_model,
        code_paths=[str(PACKAGE_DIR)],
        save_as_external_data=False,  # one self-contained model.onnx, as the stage writes it
        **onnx_kwargs,
    )
    from mlflow.pyfunc import MODEL_CONFIG

    conf = mlflow_model.flavors["python_function"]
    conf["loader_module"] = LOADER_MODULE
    conf[MODEL_CONFIG] = dict(serve_config or {})
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

    `serve_config` (vaepipe.serving.DEFAULT_CONFIG's keys) becomes the pyfunc model_config; it
    is not passed as `model_config`, which Model.log would also write into the run's params.
    """
    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],  # Model.log calls its save_model
        flavor_name="onnx",
        registered_model_name=registered_model_name or None,
        onnx_path=onnx_path,
        serve_config=serve_config,
        **onnx_kwargs,
    )


def log_onnx_model(
    onnx_path: str | Path,
    name: str,
    feeds: dict,
    outputs: dict,
    *,
    registered_model_name: str = "",
    providers: list[str],
    serve_config: dict[str, Any],
) -> str | None:
    """Log an ONNX graph as an MLflow model with signature and input example, servable with
    payload checks (vaepipe.serving); register it when a name is given. Returns the version."""
    from mlflow.models import infer_signature

    info = call(
        lambda: log_model(
            onnx_path,
            name,
            registered_model_name=registered_model_name or None,
            signature=infer_signature(feeds, outputs),
            input_example=feeds,
            onnx_execution_providers=providers,
            serve_config=serve_config,
        ),
        f"logging model {name}",
    )
    return str(info.registered_model_version) if registered_model_name else None


def set_model_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for k, v in tags.items():
        call(
            lambda k=k, v=v: client.set_model_version_tag(name, version, k, str(v)),
            f"tagging {name} v{version}",
        )


def describe_version(name: str, version: str, markdown: str) -> None:
    """The version's description in the registry (mlflow ui's model version page)."""
    import mlflow

    call(
        lambda: mlflow.MlflowClient().update_model_version(name, version, description=markdown),
        f"describing {name} v{version}",
    )


# --- reading the registry (vaepipe promote) ---------------------------------------------------


def versions(name: str) -> list:
    """Every version of registered model `name` (MLflow ModelVersion objects), oldest first;
    [] when the model is not registered at all."""
    import mlflow

    found = call(
        lambda: mlflow.MlflowClient().search_model_versions(f"name = '{name}'"),
        f"listing versions of {name}",
    )
    return sorted(found, key=lambda v: int(v.version))


def alias_version(name: str, alias: str) -> str | None:
    """The version `alias` points to, or None when the alias (or the model) is not there.
    Deleting a version removes its aliases, so an alias always names a live version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    def get() -> str | None:
        try:
            return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        except MlflowException as e:
            if "not found" in str(e):  # no such model, or no such alias
                return None
            raise

    return call(get, f"reading {name}@{alias}")


def set_alias(name: str, alias: str, version: str) -> None:
    import mlflow

    call(
        lambda: mlflow.MlflowClient().set_registered_model_alias(name, alias, version),
        f"moving {name}@{alias} to v{version}",
    )


def run_state(run_id: str) -> str:
    """'FINISHED', 'FAILED', ... of a run, 'deleted' for a deleted one, 'missing' if unknown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            return "missing"
        raise
    return "deleted" if run.info.lifecycle_stage == "deleted" else run.info.status


def download(run_id: str, artifact_path: str, dst: Path) -> Path:
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one file: no bar

    local = call(
        lambda: mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
        ),
        f"downloading {artifact_path} of run {run_id}",
    )
    return Path(local)
