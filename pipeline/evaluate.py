"""Stage evaluate: is the model good? Likelihood, reconstruction, posterior collapse, latent
quality, separation of unusual images and sample quality, and the pictures.

Writes metrics/evaluate.json (every figure; `skipped` says why a metric is absent),
metrics/summary.json (the headline figures, with train's best epoch: what DVC lists as
metrics) and plots/evaluate/ (PNGs, and kl_per_dim.json for `dvc plots show`), adds them to the
training run in MLflow, and prints a short summary.
"""

import _venv  # noqa: F401  (first: run with the project's packages)

import time

from vaepipe import config, paths
from vaepipe.device import resolve_device, set_threads
from vaepipe.errors import exit_on_user_error
from vaepipe.evaluation import report
from vaepipe.fileio import published, read_json, write_json
from vaepipe.model import checkpoint


@exit_on_user_error
def main() -> None:
    t0 = time.perf_counter()
    params = config.load(paths.PARAMS)
    device = resolve_device(params.train.device)
    set_threads(params.train.threads)
    vae, payload = checkpoint.load(paths.MODEL, device)
    trained_on = payload.get("params", {}).get("data", {}).get("dataset")
    test = report.load_test(vae, device, params.evaluate.seed)
    # the figures and the pictures appear together, once MLflow has them, or not at all
    outputs = (paths.EVALUATE_METRICS, paths.SUMMARY_METRICS, paths.EVALUATE_PLOTS)
    with published(*outputs) as out:
        measured = report.measure(vae, test, params, trained_on, out(paths.EVALUATE_PLOTS))
        seconds = time.perf_counter() - t0
        write_json(out(paths.EVALUATE_METRICS), measured.results)
        headline = report.headline(measured.results, read_json(paths.TRAIN_METRICS))
        write_json(out(paths.SUMMARY_METRICS), headline)
        run_id = report.log_to_mlflow(params, test, measured, seconds, out(paths.EVALUATE_PLOTS))
    print(report.summary(measured, vae.cfg.latent_dim, seconds, run_id))


if __name__ == "__main__":
    main()
