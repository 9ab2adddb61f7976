"""Stage export: encoder, decoder and scorer ONNX graphs, fp16/int8 variants, parity-checked,
registered with a model card each.

Writes models/{encoder,decoder,scorer}.onnx (fp32, the contract), models/{encoder,decoder}.fp16
.onnx (for GPUs) and .int8.onnx (for CPUs); metrics/export.json holds each file's size, its
parity with PyTorch and the provider that ran. Logs the fp32 graphs to the training run with
signature and input example, registers a version of export.{encoder,decoder,scorer}_model per
run, tagged with what `vaepipe promote` compares (dataset, shape, test NLL with its k and n,
digest of the test images) and described by a model card. Moves no alias: serving follows
`@champion`, which only `vaepipe promote` moves.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from vaepipe import card, checkpoint, config, export, metrics, paths, runtime, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.fileio import read_json, write_json
from vaepipe.tracking import registry

MODELS = paths.MODELS
# precision -> (converter, provider policy for its parity check); int8 is a CPU format.
VARIANTS = {"fp16": (export.to_fp16, None), "int8": (export.to_int8, "cpu")}


def export_variants(vae, files: dict, ex) -> tuple[dict, list[str]]:
    """Write the fp16 and int8 variants of encoder and decoder and measure each; (metrics,
    parity warnings). Each variant's metadata records its parity and whether it is within
    its tolerance (`vaepipe --precision auto` takes fp16 on a GPU only then).

    A variant over its tolerance is a warning, not a failure: the fp32 graphs are the contract
    and stay gated by export.parity_atol; variants are opt-in.
    """
    results: dict = {}
    warnings = []
    for precision, (convert, policy) in VARIANTS.items():
        atol = getattr(ex, f"{precision}_parity_atol")
        for name in ("encoder", "decoder"):
            src = files[name]
            dst = convert(src, src.with_name(f"{name}.{precision}.onnx"))
            sess = runtime.open_session(dst, policy or ex.provider)
            errs = export.parity(vae, **{f"{name}_sess": sess})
            worst = max(errs.values())
            export.set_metadata(
                dst, parity_max_abs_err=f"{worst:.3g}", parity_atol=atol, parity_ok=worst <= atol
            )
            key = f"{name}_{precision}"
            results[f"size_bytes/{key}"] = dst.stat().st_size
            results[f"provider/{key}"] = sess.provider
            results.update({f"parity/{key}_{k.split('_')[-1]}": v for k, v in errs.items()})
            if worst > atol:
                warnings.append(
                    f"{dst} max abs error {worst:.3g} > export.{precision}_parity_atol {atol:g}"
                )
    return results, warnings


def graph_metadata(params: config.Params, run_id: str, commit: str, ev: dict) -> dict:
    """metadata_props of every graph: what it is and how good (the page of `vaepipe site` and
    a deployment read them)."""
    kl = [round(row["kl"], 4) for row in read_json(paths.KL_PER_DIM)]
    return {
        "dataset": params.data.dataset,
        "git_commit": commit,
        "mlflow_run_id": run_id,
        "test_nll_iwae": f"{ev['test/nll_iwae']:.4f}",
        "test_nll_iwae_k": ev["iwae_k"],
        "test_nll_iwae_n": ev["iwae_n"],
        "kl_per_dim": json.dumps(kl),
    }


def contract(vae, name: str) -> list[tuple[str, str, str, str]]:
    """The graph's inputs and outputs as the model card shows them."""
    c, h, w = vae.cfg.image_shape
    image, z = f"[batch, {c}, {h}, {w}]", f"[batch, {vae.cfg.latent_dim}]"
    labels = [("input", "y", f"[batch, {vae.cfg.n_classes}]", "one-hot label")]
    rows = _contract_rows(vae, image, z)[name]
    return [*rows[:1], *(labels if vae.cfg.conditional else []), *rows[1:]]


def _contract_rows(vae, image: str, z: str) -> dict:
    return {
        "encoder": [
            ("input", "x", image, "in [0, 1]"),
            ("output", "mu", z, "posterior mean"),
            ("output", "logvar", z, "posterior log-variance"),
        ],
        "decoder": [
            ("input", "z", z, "any; N(0, I) for samples"),
            ("output", "x_mean", image, f"E[x|z] of the {vae.cfg.likelihood} likelihood"),
        ],
        "scorer": [
            ("input", "x", image, "in [0, 1]"),
            ("output", "nll", "[batch]", "nats, higher = less likely"),
        ],
    }


def example_inputs(cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    """Two images, two z and (a conditional model's graphs take them too) {"y": one-hot}:
    the input example logged with each model."""
    rng = np.random.default_rng(0)
    x = rng.random((2, *cfg.image_shape), dtype=np.float32)
    z = rng.standard_normal((2, cfg.latent_dim), dtype=np.float32)
    if not cfg.conditional:
        return x, z, {}
    return x, z, {"y": np.eye(cfg.n_classes, dtype=np.float32)[[0, 1 % cfg.n_classes]]}


def log_models(vae, files: dict, sessions, params: config.Params, facts: dict) -> list[str]:
    """Log (and register) encoder, decoder and scorer to the active run, each with its version
    tags and model card; ['model vN', ...]."""
    ex, cfg = params.export, vae.cfg
    x, z, y = example_inputs(cfg)
    graphs = {
        "encoder": ({"x": x, **y}, [0.0, 1.0], ex.encoder_model, ex.serve_max_batch),
        "decoder": ({"z": z, **y}, None, ex.decoder_model, ex.serve_max_batch),
        "scorer": ({"x": x, **y}, [0.0, 1.0], ex.scorer_model, ex.scorer_max_batch),
    }
    registered = []
    for name, (feeds, value_range, model_name, max_batch) in graphs.items():
        sess = sessions[name]
        outputs = dict(zip(sess.output_names, sess.run(feeds), strict=True))
        version = registry.log_onnx_model(
            files[name],
            name,
            feeds,
            outputs,
            registered_model_name=model_name,
            # what really ran here: listing CUDA on a CPU machine makes onnxruntime print
            # pages of errors at every load
            providers=list(dict.fromkeys([sess.provider, runtime.CPU])),
            serve_config={"max_batch": max_batch, "value_range": value_range},
        )
        page = card.render(
            card.CardFacts(
                role=name,
                name=model_name,
                version=version,
                contract=contract(vae, name),
                extra={"scorer_k": ex.scorer_k, "scorer_seed": ex.scorer_seed},
                **facts,
            )
        )
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / f"{name}.md").write_text(page)
            tracking.log_artifact(Path(d) / f"{name}.md", "model_cards")
        if version:
            tags = version_tags(name, facts, sess, cfg.image_shape)
            registry.set_model_version_tags(model_name, version, tags)
            registry.describe_version(model_name, version, page)
            registered.append(f"{model_name} v{version}")
    for p in sorted(MODELS.glob("*.fp16.onnx")) + sorted(MODELS.glob("*.int8.onnx")):
        tracking.log_artifact(p, "onnx_variants")
    tracking.log_artifact(files["prior"], "prior")  # generation: prior.onnx, then the decoder
    return registered


def version_tags(role: str, facts: dict, sess, image_shape) -> dict:
    """What `vaepipe promote` reads to decide whether two versions compare (same dataset,
    shape, width, test images, k and n) and what a user filters by."""
    p, ev = facts["params"], facts["evaluate"]
    return {
        "role": role,
        "dataset": p["data.dataset"],
        "image_shape": ",".join(str(d) for d in image_shape),
        "latent_dim": p["model.latent_dim"],
        "likelihood": p["model.likelihood"],
        "test_nll_iwae": f"{ev['test/nll_iwae']:.4f}",
        "test_nll_iwae_stderr": f"{ev['test/nll_iwae_stderr']:.4f}",
        "nll_iwae_k": ev["iwae_k"],
        "nll_iwae_n": ev["iwae_n"],
        "test_data_digest": ev["data_digest"],
        "evaluate_seed": p["evaluate.seed"],
        "git_commit": facts["git_commit"],
        "dvc_exp_name": facts["dvc_exp"] or "",
        "onnx_provider": sess.provider,
        "parity_max_abs_err": facts["export"]["parity_max_abs_err"],
        "precision": "fp32",
    }


def check_parity(vae, files: dict, ex) -> tuple[dict, dict]:
    """Sessions of the fp32 graphs and their export.json figures; ExportError over tolerance."""
    sessions = {name: runtime.open_session(p, ex.provider) for name, p in files.items()}
    eps = metrics.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    errs = export.parity_of(vae, sessions, eps)
    worst = max(v for k, v in errs.items() if not k.startswith("scorer"))
    results = {
        "opset": ex.opset,
        "provider": sessions["decoder"].provider,
        "parity_max_abs_err": worst,
        **{f"parity/{k}": v for k, v in errs.items()},
        **{f"size_bytes/{k}": p.stat().st_size for k, p in files.items()},
    }
    return sessions, results


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    ex = params.export
    vae, _ = checkpoint.load(paths.MODEL)
    train, ev = read_json(paths.TRAIN_METRICS), read_json(paths.EVALUATE_METRICS)
    run_id, commit = train["run_id"], tracking.git_commit() or "unknown"
    eps = metrics.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    meta = graph_metadata(params, run_id, commit, ev)
    files = export.export_models(vae, MODELS, ex.opset, meta, eps, ex.scorer_seed)
    sessions, results = check_parity(vae, files, ex)
    variant_results, warnings = export_variants(vae, files, ex)
    results.update(variant_results)
    write_json(paths.EXPORT_METRICS, results)
    worst = results["parity_max_abs_err"]
    if worst > ex.parity_atol:
        raise export.ExportError(
            f"ONNX parity failed: max abs error {worst:.3g} > export.parity_atol "
            f"{ex.parity_atol:g} ({ {k: v for k, v in results.items() if 'parity/' in k} })"
        )
    scorer_worst = max(v for k, v in results.items() if k.startswith("parity/scorer"))
    # float32 sums of large densities (tiny gaussian sigma)
    if scorer_worst > export.SCORER_ATOL_NATS:
        warnings.append(f"scorer.onnx differs from PyTorch by {scorer_worst:.3g} nats")
    facts = {
        "run_id": run_id,
        "git_commit": commit,
        "dvc_exp": os.environ.get("DVC_EXP_NAME"),
        "params": config.flatten(params),
        "train": train,
        "evaluate": ev,
        "export": results,
    }
    with tracking.run(params.mlflow.experiment, run_id=run_id):
        tracking.set_tags({"onnx_provider": results["provider"]})
        tracking.log_metrics({f"export/{k}": v for k, v in results.items() if "parity" in k})
        registered = log_models(vae, files, sessions, params, facts)
    print(
        f"export: {', '.join(str(p) for p in files.values())} (opset {ex.opset}) and the "
        f"fp16/int8 variants of encoder and decoder; onnxruntime ran on {results['provider']}; "
        f"parity max abs error {worst:.2e} (scorer {scorer_worst:.2e} nats)"
    )
    if registered:
        print(
            f"export: registered {', '.join(registered)} in MLflow, each with its model card; "
            "no alias moved (`vaepipe promote` decides what @champion serves)"
        )
    for w in warnings:
        print(f"export: warning: {w}; use this variant knowingly")


if __name__ == "__main__":
    main()
