"""What the export stage releases: the fp32 graphs' metadata and parity, the fp16 and int8
variants with theirs, and the MLflow models registered from them, each with its version tags
(what `vaepipe promote` compares) and its model card. Registering moves no alias.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from vaepipe import config, paths, tracking
from vaepipe.evaluation import likelihood
from vaepipe.export import graphs, variants
from vaepipe.fileio import read_json
from vaepipe.inference import runtime
from vaepipe.tracking import card, registry

# precision -> (converter, provider policy for its parity check); int8 is a CPU format.
VARIANTS = {"fp16": (variants.to_fp16, None), "int8": (variants.to_int8, "cpu")}


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
            errs = graphs.parity(vae, **{f"{name}_sess": sess})
            worst = max(errs.values())
            variants.set_metadata(
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
    tags and model card; ['model vN', ...]. A graph this export of the run already registered
    (same run, same bytes, same companions) is not registered again: a complete version is
    reused, an interrupted one finished."""
    specs = graph_specs(vae.cfg, params.export)
    digests = {name: registry.file_digest(files[name]) for name in specs}
    registration = {registry.EXPORT_ID: export_id(facts["run_id"], digests)}
    registered = []
    for name, spec in specs.items():
        tags = {**registration, registry.GRAPH_DIGEST: digests[name]}
        said = release_graph(
            vae, name, spec=spec, path=files[name], sess=sessions[name], params=params,
            facts=facts, registration=tags,
        )  # fmt: skip
        registered += [said] if said else []
    folder = files["decoder"].parent
    for p in sorted(folder.glob("*.fp16.onnx")) + sorted(folder.glob("*.int8.onnx")):
        tracking.log_artifact(p, "onnx_variants")
    tracking.log_artifact(files["prior"], "prior")  # generation: prior.onnx, then the decoder
    return registered


def graph_specs(cfg, ex) -> dict:
    """{graph: (input example, value range, registered model name, serving max_batch)}."""
    x, z, y = example_inputs(cfg)
    scorer_most = min(ex.scorer_max_batch, graphs.scorer_max_images(cfg, ex.scorer_k) or math.inf)
    return {
        "encoder": ({"x": x, **y}, [0.0, 1.0], ex.encoder_model, ex.serve_max_batch),
        "decoder": ({"z": z, **y}, None, ex.decoder_model, ex.serve_max_batch),
        "scorer": ({"x": x, **y}, [0.0, 1.0], ex.scorer_model, scorer_most),
    }


def export_id(run_id: str, digests: dict[str, str]) -> str:
    """16 hex digits naming one export: its run and the digests of its graphs, together."""
    text = "\n".join([run_id, *(f"{name} {digests[name]}" for name in sorted(digests))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def release_graph(
    vae, name: str, *, spec, path, sess, params, facts: dict, registration: dict
) -> str | None:
    """Log one graph and register it with its tags and card (`registration`: its digest and
    export id), or reuse or finish the version of this export that holds it; 'model vN'."""
    feeds, value_range, model_name, max_batch = spec
    found = None
    if model_name:
        digest, export = registration[registry.GRAPH_DIGEST], registration[registry.EXPORT_ID]
        found = registry.existing_version(model_name, facts["run_id"], digest, export)
        if (
            found is not None
            and registry.is_complete(found)
            and registry.GRAPH_DIGEST in found.tags
        ):
            return f"{model_name} v{found.version} (registered before: reused)"
    tags = {**version_tags(name, facts, sess, vae.cfg.image_shape), **registration}
    if found is not None:
        version, have = str(found.version), dict(found.tags)
    else:
        outputs = dict(zip(sess.output_names, sess.run(feeds), strict=True))
        uri = registry.log_onnx_model(
            path,
            name,
            feeds,
            outputs,
            # what really ran here: listing CUDA on a CPU machine makes onnxruntime print
            # pages of errors at every load
            providers=list(dict.fromkeys([sess.provider, runtime.CPU])),
            serve_config={"max_batch": max_batch, "value_range": value_range},
        )
        have = {**tags, registry.COMPLETE: "false"}
        version = registry.register_version(uri, model_name, have) if model_name else None
    page = model_card(
        vae, name, model_name=model_name, version=version, ex=params.export, facts=facts
    )
    if version is None:
        return None
    registry.finish_version(model_name, version, tags, page, have)
    return f"{model_name} v{version}" + ("" if found is None else " (finished)")


def model_card(vae, role: str, *, model_name: str, version: str | None, ex, facts: dict) -> str:
    """The graph's model card, logged to the run as model_cards/<role>.md; its markdown."""
    page = card.render(
        card.CardFacts(
            role=role,
            name=model_name,
            version=version,
            contract=contract(vae, role),
            extra={"scorer_k": ex.scorer_k, "scorer_seed": ex.scorer_seed},
            **facts,
        )
    )
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"{role}.md").write_text(page)
        tracking.log_artifact(Path(d) / f"{role}.md", "model_cards")
    return page


def version_tags(role: str, facts: dict, sess, image_shape) -> dict:
    """What `vaepipe promote` reads to decide whether two versions compare (same dataset,
    shape, width, test images, k and n), the run artifact of per-image NLLs the version was
    judged on (named by that protocol), and what a user filters by."""
    p, ev = facts["params"], facts["evaluate"]
    protocol = (ev["iwae_k"], ev["iwae_n"], p["evaluate.seed"], ev["data_digest"])
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
        registry.PER_IMAGE: registry.per_image_path(*protocol),
        "git_commit": facts["git_commit"],
        "dvc_exp_name": facts["dvc_exp"] or "",
        "onnx_provider": sess.provider,
        "parity_max_abs_err": facts["export"]["parity_max_abs_err"],
        "precision": "fp32",
    }


def check_parity(vae, files: dict, ex) -> tuple[dict, dict]:
    """Sessions of the fp32 graphs and their export.json figures; ExportError over tolerance."""
    sessions = {name: runtime.open_session(p, ex.provider) for name, p in files.items()}
    eps = likelihood.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    errs = graphs.parity_of(vae, sessions, eps)
    worst = max(v for k, v in errs.items() if not k.startswith("scorer"))
    results = {
        "opset": ex.opset,
        "provider": sessions["decoder"].provider,
        "parity_max_abs_err": worst,
        **{f"parity/{k}": v for k, v in errs.items()},
        **{f"size_bytes/{k}": p.stat().st_size for k, p in files.items()},
    }
    return sessions, results


def export_graphs(
    vae, params: config.Params, run_id: str, commit: str, ev: dict, *, out_dir: Path
) -> dict:
    """The four fp32 graphs in out_dir, their metadata saying what they are and how good:
    {name: path}."""
    ex = params.export
    eps = likelihood.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    meta = graph_metadata(params, run_id, commit, ev)
    return graphs.export_models(
        vae, out_dir, ex.opset, meta, scorer_eps=eps, scorer_seed=ex.scorer_seed
    )


def gate(results: dict, ex) -> list[str]:
    """ExportError when the fp32 graphs miss export.parity_atol; else the warnings to print
    (a scorer off by more than graphs.SCORER_ATOL_NATS: float32 sums of large densities, as
    with a tiny Gaussian sigma)."""
    worst = results["parity_max_abs_err"]
    if worst > ex.parity_atol:
        raise graphs.ExportError(
            f"ONNX parity failed: max abs error {worst:.3g} > export.parity_atol "
            f"{ex.parity_atol:g} ({ {k: v for k, v in results.items() if 'parity/' in k} })"
        )
    scorer_worst = max(v for k, v in results.items() if k.startswith("parity/scorer"))
    if scorer_worst > graphs.SCORER_ATOL_NATS:
        return [f"scorer.onnx differs from PyTorch by {scorer_worst:.3g} nats"]
    return []


def register(vae, files: dict, sessions: dict, params: config.Params, facts: dict) -> list[str]:
    """Into the pipeline's run: the provider that ran, the parity figures, and the models
    (logged, registered, tagged, described by their cards; those this export of the run
    registered before are reused or finished, not registered again); ['model vN', ...]."""
    results = facts["export"]
    with tracking.run(params.mlflow.experiment, run_id=facts["run_id"]):
        tracking.set_tags(
            {
                "onnx_provider": results["provider"],
                "parity_max_abs_err": f"{results['parity_max_abs_err']:.3g}",
            }
        )
        versions = log_models(vae, files, sessions, params, facts)
        tracking.log_table(parity_table(results), "export/parity.json")  # the models first
        return versions


def parity_table(results: dict) -> dict[str, list]:
    """export.json's parity/GRAPH_bN figures as columns: graph, batch, max_abs_err, provider."""
    table = {"graph": [], "batch": [], "max_abs_err": [], "provider": []}
    for key, err in sorted(results.items()):
        if not key.startswith("parity/"):
            continue
        graph, batch = key.removeprefix("parity/").rsplit("_b", 1)
        table["graph"].append(graph)
        table["batch"].append(int(batch))
        table["max_abs_err"].append(err)
        table["provider"].append(results.get(f"provider/{graph}", results["provider"]))
    return table


def summary(files: dict, results: dict, opset: int) -> str:
    scorer_worst = max(v for k, v in results.items() if k.startswith("parity/scorer"))
    return (
        f"export: {', '.join(str(p) for p in files.values())} (opset {opset}) and the "
        f"fp16/int8 variants of encoder and decoder; onnxruntime ran on {results['provider']}; "
        f"parity max abs error {results['parity_max_abs_err']:.2e} "
        f"(scorer {scorer_worst:.2e} nats)"
    )
