"""Stage export: encoder, decoder, scorer and prior ONNX graphs, fp16/int8 variants of encoder
and decoder, parity-checked, registered in MLflow with a model card each.

Writes models/*.onnx (the fp32 graphs are the contract) and metrics/export.json (each file's
size, its parity with PyTorch, the provider that ran). Moves no alias: serving follows
`@champion`, which only `vaepipe promote` moves.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import os

from vaepipe import config, paths, tracking
from vaepipe.errors import exit_on_user_error
from vaepipe.export import release
from vaepipe.export.graphs import ExportError
from vaepipe.fileio import published, read_json, write_json
from vaepipe.model import checkpoint

# the graphs and their variants (dvc.yaml's outs) and export.json: replaced together, and only
# by graphs that passed the parity gate
GRAPHS = ("encoder", "decoder", "scorer", "prior")
VARIANTS = ("encoder.fp16", "decoder.fp16", "encoder.int8", "decoder.int8")
OUTPUTS = (*(paths.MODELS / f"{n}.onnx" for n in GRAPHS + VARIANTS), paths.EXPORT_METRICS)


@exit_on_user_error
def main() -> None:
    params = config.load(paths.PARAMS)
    ex = params.export
    vae, _ = checkpoint.load(paths.MODEL)
    train, ev = read_json(paths.TRAIN_METRICS), read_json(paths.EVALUATE_METRICS)
    run_id, commit = train["run_id"], tracking.git_commit() or "unknown"
    with published(*OUTPUTS) as out:
        try:
            staged = release.export_graphs(
                vae, params, run_id, commit, ev, out_dir=out(paths.MODELS)
            )
            sessions, results = release.check_parity(vae, staged, ex)
            variant_results, warnings = release.export_variants(vae, staged, ex)
            results.update(variant_results)
            warnings += release.gate(results, ex)
            # the files are named where they are published, not where they were staged
            warnings = [w.replace(str(out(paths.MODELS)), str(paths.MODELS)) for w in warnings]
        except ExportError as e:  # the graphs in models/ stay; the run says why
            tracking.mark_failed(params.mlflow.experiment, run_id, f"export: {e}")
            raise
        write_json(out(paths.EXPORT_METRICS), results)
    files = {name: paths.MODELS / p.name for name, p in staged.items()}
    facts = {
        "run_id": run_id,
        "git_commit": commit,
        "dvc_exp": os.environ.get("DVC_EXP_NAME"),
        "params": config.flatten(params),
        "train": train,
        "evaluate": ev,
        "export": results,
    }
    registered = release.register(vae, files, sessions, params, facts)
    print(release.summary(files, results, ex.opset))
    if registered:
        print(
            f"export: MLflow model versions {', '.join(registered)}, each registered with its "
            "model card; "
            "no alias moved (`vaepipe promote` decides what @champion serves)"
        )
    for w in warnings:
        print(f"export: warning: {w}; use this variant knowingly")


if __name__ == "__main__":
    main()
