"""Models in MLflow: ONNX graphs logged as servable models, registered and tagged.

A logged graph is an ordinary ONNX-flavour model (mlflow.onnx.load_model and the raw model.onnx
work) whose python_function flavour names `vaepipe.inference.serving` as its loader_module, with
the serving limits as its model_config and the vaepipe package copied in (code_paths), so it
loads wherever it is served, through its own copy. Only the name of the serving module is needed
here: editing serving.py reruns no stage. Every call goes through the store's retry policy.

A registered version is complete or invisible: it is created with every version tag, the
digest of its graph (`onnx_sha256`), the id of the export it belongs to (`export_id`, shared by
the encoder, decoder and scorer of one export) and `complete=false`; its description (the
model card) follows, and `complete=true` is set last. `versions` lists only complete ones (and
those registered before these tags, which have a `dataset` tag and a description); export
reuses or finishes the version of the same run and graph instead of registering it again.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from vaepipe.errors import VaepipeError
from vaepipe.tracking.store import TrackingError, call, tracking_uri

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/vaepipe, copied into every model
LOADER_MODULE = "vaepipe.inference.serving"
MLMODEL = "MLmodel"
# version tags of a registration (beside release.version_tags' description of the model)
GRAPH_DIGEST = "onnx_sha256"  # SHA-256 of the registered model.onnx
EXPORT_ID = "export_id"  # the export the version belongs to: its run and its three graphs
COMPLETE = "complete"  # "false" from creation until tags and description are all there
PER_IMAGE = "per_image_nll"  # the run's artifact of per-image NLLs the version was judged on


def per_image_path(k: int, n: int, seed: int, digest: str) -> str:
    """The run artifact the evaluate stage logs each image's NLL under, named by its protocol
    (k samples, the first n test images, evaluate.seed, the test data's digest)."""
    return f"evaluation/per_image_nll/k{k}-n{n}-seed{seed}-{digest}.npz"


def file_digest(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(version) -> bool:
    """Whether a version's registration finished: `complete=true`, or (a version registered
    before that tag existed) a `dataset` tag and a description."""
    tags = version.tags or {}
    if COMPLETE in tags:
        return tags[COMPLETE] == "true"
    return "dataset" in tags and bool(version.description)


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
    """mlflow.onnx.save_model, then point python_function at vaepipe.inference.serving
    (Model.log calls this through `flavor.save_model`)."""
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

    `serve_config` (vaepipe.inference.serving.DEFAULT_CONFIG's keys) becomes the pyfunc
    model_config; it is not passed as `model_config`, which Model.log would also write into the
    run's params.
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
    providers: list[str],
    serve_config: dict[str, Any],
) -> str:
    """Log an ONNX graph as an MLflow model with signature and input example, servable with
    payload checks (vaepipe.inference.serving); its model URI (`register_version` registers
    it)."""
    from mlflow.models import infer_signature

    info = call(
        lambda: log_model(
            onnx_path,
            name,
            signature=infer_signature(feeds, outputs),
            input_example=feeds,
            onnx_execution_providers=providers,
            serve_config=serve_config,
        ),
        f"logging model {name}",
    )
    return info.model_uri


def register_version(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    """A new version of registered model `name` holding the logged model, created with `tags`
    in the same call (no version without them); its number."""
    import mlflow

    version = call(
        lambda: mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()}),
        f"registering {name}",
    )
    return str(version.version)


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


def finish_version(
    name: str, version: str, tags: dict[str, Any], markdown: str, have: dict[str, str]
) -> None:
    """Make a registered version complete: the tags it lacks or has other values of (`have`:
    those it has), its description, then `complete=true`, last, so that an interruption
    leaves it invisible."""
    missing = {k: v for k, v in tags.items() if k != COMPLETE and have.get(k) != str(v)}
    set_model_version_tags(name, version, missing)
    describe_version(name, version, markdown)
    set_model_version_tags(name, version, {COMPLETE: "true"})


def versions_of_run(name: str, run_id: str) -> list:
    """Every version of `name` registered from run `run_id`, complete or not, oldest first."""
    import mlflow

    found = call(
        lambda: mlflow.MlflowClient().search_model_versions(
            f"name = '{name}' and run_id = '{run_id}'"
        ),
        f"listing versions of {name} of run {run_id}",
    )
    return sorted(found, key=lambda v: int(v.version))


def stored_digest(name: str, version: str) -> str | None:
    """SHA-256 of the model.onnx a version holds, or None when the store has none to give."""
    import mlflow

    def read() -> str | None:
        uri = mlflow.MlflowClient().get_model_version_download_uri(name, version)
        with tempfile.TemporaryDirectory() as d:
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{uri.rstrip('/')}/model.onnx", dst_path=d
                )
            except OSError:  # a local artifact store without the file
                return None
            return file_digest(local)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return call(read, f"reading the graph of {name} v{version}")
    except TrackingError as e:
        if "refused" in str(e):  # no such file: not this graph
            return None
        raise


def existing_version(name: str, run_id: str, digest: str, export_id: str):
    """The version of `name` that already holds this graph of this export of run `run_id`,
    complete ones first; else an untagged version of the run (an interrupted registration, or
    one made before graph digests were tagged) whose model.onnx has this digest; else None."""
    mine = versions_of_run(name, run_id)
    same = [
        v
        for v in mine
        if v.tags.get(GRAPH_DIGEST) == digest and v.tags.get(EXPORT_ID) == export_id
    ]
    if same:
        return min(same, key=lambda v: (not is_complete(v), int(v.version)))
    for v in mine:
        if GRAPH_DIGEST not in v.tags and stored_digest(name, str(v.version)) == digest:
            return v
    return None


# --- reading the registry (vaepipe promote) ---------------------------------------------------


def versions(name: str, include_incomplete: bool = False) -> list:
    """The complete versions of registered model `name` (MLflow ModelVersion objects; every
    version with include_incomplete), oldest first; [] when the model is not registered."""
    import mlflow

    found = call(
        lambda: mlflow.MlflowClient().search_model_versions(f"name = '{name}'"),
        f"listing versions of {name}",
    )
    found = found if include_incomplete else [v for v in found if is_complete(v)]
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


def delete_alias(name: str, alias: str) -> bool:
    """Remove `name@alias`; whether there was one."""
    import mlflow

    if alias_version(name, alias) is None:
        return False
    call(
        lambda: mlflow.MlflowClient().delete_registered_model_alias(name, alias),
        f"removing {name}@{alias}",
    )
    return True


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


MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def fetch_graph(uri: str, dst: Path) -> tuple[Path, Path | None, str]:
    """(model.onnx, the run's prior.onnx or None, "name vN") of a registered version named by
    `uri` (models:/NAME@ALIAS or models:/NAME/VERSION), downloaded into `dst`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.match(uri)
    if not match:
        raise VaepipeError(f"{uri} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match["name"], match["alias"], match["version"]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = mlflow.MlflowClient()

    def lookup():
        try:
            if alias:
                return client.get_model_version_by_alias(name, alias)
            return client.get_model_version(name, number)
        except MlflowException as e:
            if "not found" in str(e) or "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
                return None
            raise

    version = call(lookup, f"looking up {uri}")
    if version is None:
        raise VaepipeError(f"{uri}: the MLflow store {tracking_uri()} has no such model version")
    source = client.get_model_version_download_uri(name, version.version).rstrip("/")
    graph = call(
        lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source}/model.onnx", dst_path=str(dst)
        ),
        f"downloading the graph of {name} v{version.version}",
    )
    try:
        prior = download(version.run_id, "prior/prior.onnx", dst / "prior")
    except TrackingError:
        prior = None  # not a decoder's run, or exported before the prior graph was logged
    return Path(graph), prior, f"{name} v{version.version}"
