"""Stage export: models/encoder.onnx and models/decoder.onnx, parity-checked in onnxruntime.

Writes metrics/export.json (parity max abs error at batch 1 and 257, sizes, the provider that
ran) and logs both models to the training run with signature and input example.
"""

from pathlib import Path

import numpy as np

from vaepipe import checkpoint, config, export, runtime, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import read_json, write_json

MODELS = Path("models")
OUT = Path("metrics/export.json")


@exit_on_user_error
def main() -> None:
    params = config.load("params.yaml")
    ex = params.export
    vae, payload = checkpoint.load(MODELS / "vae.pt")
    run_id = read_json("metrics/train.json")["run_id"]
    commit = tracking.run_tags(params.data.dataset, "cpu").get("git_commit", "unknown")
    meta = {"dataset": params.data.dataset, "git_commit": commit, "mlflow_run_id": run_id}
    paths = export.export_models(vae, MODELS, ex.opset, meta)
    sessions = {name: runtime.open_session(p, ex.provider) for name, p in paths.items()}
    provider = sessions["decoder"].provider
    errs = export.parity(vae, sessions["encoder"], sessions["decoder"])
    worst = max(errs.values())
    results = {
        "opset": ex.opset,
        "provider": provider,
        "parity_max_abs_err": worst,
        **{f"parity/{k}": v for k, v in errs.items()},
        **{f"size_bytes/{k}": p.stat().st_size for k, p in paths.items()},
    }
    write_json(OUT, results)
    if worst > ex.parity_atol:
        raise export.ExportError(
            f"ONNX parity failed: max abs error {worst:.3g} > export.parity_atol "
            f"{ex.parity_atol:g} ({errs})"
        )
    with tracking.run(params.mlflow.experiment, run_id=run_id):
        import mlflow
        import onnx
        from mlflow.models import infer_signature

        mlflow.set_tag("onnx_provider", provider)
        mlflow.log_metrics({"export/parity_max_abs_err": worst})
        cfg = vae.cfg
        x_ex = np.random.default_rng(0).random((2, *cfg.image_shape), dtype=np.float32)
        z_ex = np.random.default_rng(0).standard_normal((2, cfg.latent_dim), dtype=np.float32)
        examples = {
            "encoder": ({"x": x_ex}, sessions["encoder"]),
            "decoder": ({"z": z_ex}, sessions["decoder"]),
        }
        for name, (feeds, sess) in examples.items():
            outputs = dict(
                zip([o.name for o in sess.session.get_outputs()], sess.run(feeds), strict=True)
            )
            mlflow.onnx.log_model(
                onnx.load(str(paths[name])),
                name=name,
                signature=infer_signature(feeds, outputs),
                input_example=feeds,
                onnx_execution_providers=list(dict.fromkeys([provider, runtime.CPU])),
            )
    print(
        f"export: {', '.join(str(p) for p in paths.values())} (opset {ex.opset}); onnxruntime "
        f"ran on {provider}; parity max abs error {worst:.2e}"
    )


if __name__ == "__main__":
    main()
