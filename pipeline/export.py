"""Stage export: encoder/decoder ONNX graphs and their fp16/int8 variants, parity-checked.

Writes models/{encoder,decoder}.onnx (fp32, the contract), models/*.fp16.onnx (for GPUs) and
models/*.int8.onnx (for CPUs); metrics/export.json holds each file's size, its parity with
PyTorch and the provider that ran. Logs both fp32 graphs to the training run with signature and
input example, registered as export.encoder_model / export.decoder_model, servable with
`mlflow models serve` (payloads checked by vaepipe.serving).
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import numpy as np

from vaepipe import checkpoint, config, export, paths, runtime, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import read_json, write_json
from vaepipe.tracking import registry

MODELS = paths.MODELS
# precision -> (converter, provider policy for its parity check); int8 is a CPU format.
VARIANTS = {"fp16": (export.to_fp16, None), "int8": (export.to_int8, "cpu")}


def export_variants(vae, files: dict, ex) -> tuple[dict, list[str]]:
    """Write each variant of each graph and measure it; (metrics, parity warnings).

    A variant over its tolerance is a warning, not a failure: the fp32 graphs are the contract
    and stay gated by export.parity_atol; variants are opt-in (`vaepipe --precision`).
    """
    results: dict = {}
    warnings = []
    for precision, (convert, policy) in VARIANTS.items():
        atol = getattr(ex, f"{precision}_parity_atol")
        for name, src in files.items():
            dst = convert(src, src.with_name(f"{name}.{precision}.onnx"))
            sess = runtime.open_session(dst, policy or ex.provider)
            errs = export.parity(vae, **{f"{name}_sess": sess})
            key = f"{name}_{precision}"
            results[f"size_bytes/{key}"] = dst.stat().st_size
            results[f"provider/{key}"] = sess.provider
            results.update({f"parity/{key}_{k.split('_')[-1]}": v for k, v in errs.items()})
            worst = max(errs.values())
            if worst > atol:
                warnings.append(
                    f"{dst} max abs error {worst:.3g} > export.{precision}_parity_atol {atol:g}"
                )
    return results, warnings


def log_models(vae, files: dict, sessions, ex, results: dict) -> dict[str, str]:
    """Log (and register) encoder and decoder to the active run; {name: 'model vN'}."""
    cfg = vae.cfg
    rng = np.random.default_rng(0)
    inputs = {
        "encoder": ({"x": rng.random((2, *cfg.image_shape), dtype=np.float32)}, [0.0, 1.0]),
        "decoder": ({"z": rng.standard_normal((2, cfg.latent_dim), dtype=np.float32)}, None),
    }
    registered = {"encoder": ex.encoder_model, "decoder": ex.decoder_model}
    versions = {}
    for name, (feeds, value_range) in inputs.items():
        sess = sessions[name]
        outputs = dict(zip(sess.output_names, sess.run(feeds), strict=True))
        version = registry.log_onnx_model(
            files[name],
            name,
            feeds,
            outputs,
            registered_model_name=registered[name],
            # what really ran here: listing CUDA on a CPU machine makes onnxruntime print
            # pages of errors at every load
            providers=list(dict.fromkeys([sess.provider, runtime.CPU])),
            serve_config={"max_batch": ex.serve_max_batch, "value_range": value_range},
        )
        if version:
            tags = {
                "onnx_provider": sess.provider,
                "parity_max_abs_err": results["parity_max_abs_err"],
                "precision": "fp32",
            }
            registry.set_model_version_tags(registered[name], version, tags)
            versions[name] = f"{registered[name]} v{version}"
    for p in sorted(MODELS.glob("*.fp16.onnx")) + sorted(MODELS.glob("*.int8.onnx")):
        tracking.log_artifact(p, "onnx_variants")
    return versions


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    ex = params.export
    vae, payload = checkpoint.load(paths.MODEL)
    run_id = read_json(paths.TRAIN_METRICS)["run_id"]
    commit = tracking.git_commit() or "unknown"
    meta = {"dataset": params.data.dataset, "git_commit": commit, "mlflow_run_id": run_id}
    files = export.export_models(vae, MODELS, ex.opset, meta)
    sessions = {name: runtime.open_session(p, ex.provider) for name, p in files.items()}
    provider = sessions["decoder"].provider
    errs = export.parity(vae, sessions["encoder"], sessions["decoder"])
    worst = max(errs.values())
    results = {
        "opset": ex.opset,
        "provider": provider,
        "parity_max_abs_err": worst,
        **{f"parity/{k}": v for k, v in errs.items()},
        **{f"size_bytes/{k}": p.stat().st_size for k, p in files.items()},
    }
    variant_results, warnings = export_variants(vae, files, ex)
    results.update(variant_results)
    write_json(paths.EXPORT_METRICS, results)
    if worst > ex.parity_atol:
        raise export.ExportError(
            f"ONNX parity failed: max abs error {worst:.3g} > export.parity_atol "
            f"{ex.parity_atol:g} ({errs})"
        )
    with tracking.run(params.mlflow.experiment, run_id=run_id):
        tracking.set_tags({"onnx_provider": provider})
        tracking.log_metrics({f"export/{k}": v for k, v in results.items() if "parity" in k})
        versions = log_models(vae, files, sessions, ex, results)
    print(
        f"export: {', '.join(str(p) for p in files.values())} (opset {ex.opset}) and their "
        f"fp16/int8 variants; onnxruntime ran on {provider}; parity max abs error {worst:.2e}"
    )
    if versions:
        print(f"export: registered {', '.join(versions.values())} in MLflow")
    for w in warnings:
        print(f"export: warning: {w}; use this variant knowingly")


if __name__ == "__main__":
    main()
