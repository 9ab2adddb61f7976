"""`vaepipe`: the command line. Run the exported graphs with onnxruntime (generate, encode,
decode, interpolate, score, info: vaepipe.inference.commands), compare the runs of the MLflow
store (runs), move @champion (promote), build the browser page (site), search params (tune)
and set runs beside the published table (literature).

No torch: `vaepipe generate` starts and finishes in well under a second on a CPU, and MLflow is
imported only by the commands that read the store.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from vaepipe import imagefiles, paths
from vaepipe.errors import VaepipeError, exit_on_user_error, redact
from vaepipe.inference import commands, runtime, site
from vaepipe.tracking import literature
from vaepipe.tuning import command as tuning_command

ENCODER = str(paths.ENCODER)
DECODER = str(paths.DECODER)
PRECISIONS = ("auto", "fp32", "fp16", "int8")


def cmd_runs(args) -> str:
    from vaepipe.tracking import compare  # MLflow is imported only by this command

    sort = args.sort and compare.metric_name(args.sort)
    runs = compare.sort_runs(compare.load_runs(args.experiment, args.study), sort, args.desc)
    params = args.params or compare.DEFAULT_PARAMS
    metrics = args.metrics or compare.DEFAULT_METRICS
    if args.study:
        params = ["trial", *(args.params or compare.varying_params(runs))]
        metrics = args.metrics or compare.TRIAL_METRICS
    metrics = [compare.metric_name(m) for m in metrics]
    print(compare.format_table(runs, params, metrics))
    if args.plot:
        ys = [m for m in args.metrics if m.startswith("test/")] if args.metrics else None
        ys = ys or list(compare.PLOT_METRICS)
        out = commands.check_out(args.plot, (".png",))
        compare.comparison_plot(runs, out, args.x, ys, args.hue)
        return f"{len(runs)} runs of '{args.experiment}'; plot -> {args.plot}"
    return ""


def _registered_names() -> tuple[str, list[str]]:
    """(decoder, [encoder, scorer]) registered model names: params.yaml's, where there is one."""
    from vaepipe import config

    if not paths.PARAMS.is_file():
        raise VaepipeError(f"no {paths.PARAMS} here to name the registered models; pass --model")
    ex = config.load(paths.PARAMS).export
    return ex.decoder_model, [n for n in (ex.encoder_model, ex.scorer_model) if n]


def cmd_promote(args) -> str:
    from vaepipe import tracking
    from vaepipe.tracking import promotion

    uri = tracking.setup_existing_uri()
    decoder, companions = _registered_names() if args.model is None else (args.model, args.with_)
    champion, rows, winner = promotion.decide(decoder, args.version, args.force)
    print(f"MLflow store {redact(uri)}, registered model {decoder}")
    print(promotion.format_table(rows, champion))
    if unfinished := promotion.incomplete(decoder):
        print(
            f"not considered: {decoder} v{', v'.join(unfinished)} (registration incomplete; "
            "rerun the export stage of its run to finish it)"
        )
    newest = promotion.challenger(rows, champion, winner)
    if args.dry_run:
        return f"dry run: would move @champion to {f'v{winner.version}' if winner else 'nothing'}"
    moved = promotion.move(decoder, companions if winner else [], winner, newest)
    if winner is None and champion is not None:
        moved.insert(0, f"{decoder}@champion stays v{champion.version}")
    return "; ".join(moved) or "nothing to promote"


# --- argument parsing --------------------------------------------------------------------------


def _whole_number(text: str, lo: int, hi: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < lo or (hi is not None and value > hi):
        raise argparse.ArgumentTypeError(f"{value} {what}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1, None, "must be at least 1")


def _seed(text: str) -> int:
    """numpy's generators take seeds 0 .. 2^128 - 1; the pipeline's params use 0 .. 2^32 - 1."""
    return _whole_number(text, 0, 2**32 - 1, f"is not a seed in 0 .. {2**32 - 1}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def _common(p: argparse.ArgumentParser, model: str, precision: bool = True) -> None:
    p.add_argument(
        "--model",
        default=model,
        help=f"ONNX graph, or a registered version: models:/NAME@ALIAS (default: {model})",
    )
    p.add_argument(
        "--provider",
        choices=runtime.POLICIES,
        default="auto",
        help="auto: CUDA when it really loads, else CPU; cuda / tensorrt: that GPU provider "
        "or an error, never a silent CPU (tensorrt: fp16 engines cached in .trt-cache, or "
        "VAEPIPE_TRT_CACHE) (default: auto)",
    )
    if precision:
        p.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="fp16 / int8: the export stage's <model>.fp16.onnx (GPUs) or <model>.int8.onnx "
            "(CPUs) beside --model; auto: fp16 on a GPU when its parity was within "
            "export.fp16_parity_atol, else fp32 (default: auto)",
        )
    p.add_argument(
        "--batch-size", type=_positive, default=4096, help="rows per onnxruntime call (4096)"
    )
    p.add_argument(
        "--label",
        type=int,
        help="a conditional model's class for every row (encode, decode and score also read "
        "labels y from the input .npz)",
    )
    p.add_argument("--verbose", action="store_true", help="also say why the provider was chosen")


def _scale_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scale",
        type=_positive,
        help="draw each image this many times larger in a .png (default: about "
        f"{imagefiles.READABLE} px per image)",
    )


def _add_model_commands(sub) -> None:
    """generate, encode, decode, interpolate: the exported graphs at work."""
    p = sub.add_parser("generate", help="sample z from the prior and decode it")
    _common(p, DECODER)
    p.add_argument(
        "--prior",
        help="prior.onnx mapping (eps, u) to z (default: prior.onnx beside --model when present, "
        "which the export stage writes: the learned prior; 'none': z ~ N(0, I))",
    )
    p.add_argument("--n", type=_positive, default=64, help="number of samples (64)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of z (0)")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="std of z (1.0)")
    p.add_argument("--cols", type=_positive, help="grid columns (default: ~sqrt(n))")
    p.add_argument("--out", required=True, help="grid.png (image grid) or samples.npz (z, x_mean)")
    _scale_option(p)
    p.set_defaults(fn=commands.cmd_generate)

    p = sub.add_parser("encode", help="images -> mu, logvar")
    p.add_argument(
        "input", help="images.npz (x [N,H,W] or [N,C,H,W], uint8 or [0,1]) or a PNG folder"
    )
    _common(p, ENCODER)
    p.add_argument("--out", required=True, help="latents.npz (mu, logvar, and y or names)")
    p.set_defaults(fn=commands.cmd_encode)

    p = sub.add_parser("decode", help="latents -> images")
    p.add_argument("latents", help=".npz with z [N, latent_dim] (or mu, as encode writes)")
    _common(p, DECODER)
    p.add_argument("--key", help="array to decode (default: z, else mu)")
    p.add_argument("--cols", type=_positive, help="grid columns (default: ~sqrt(N))")
    p.add_argument("--out", required=True, help="grid.png or images.npz (z, x_mean)")
    _scale_option(p)
    p.set_defaults(fn=commands.cmd_decode)

    _add_reconstruct(sub)

    p = sub.add_parser("interpolate", help="decode paths between latent points")
    _common(p, DECODER)
    p.add_argument("--steps", type=_positive, default=10, help="points per path (10)")
    p.add_argument("--pairs", type=_positive, default=4, help="random endpoint pairs (4)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random endpoints (0)")
    p.add_argument("--latents", help=".npz (z or mu) to take the endpoints from, with --index")
    p.add_argument("--index", type=int, nargs=2, default=(0, 1), metavar=("A", "B"))
    p.add_argument(
        "--method", choices=("slerp", "lerp"), default="slerp", help="path shape (slerp)"
    )
    p.add_argument("--out", required=True, help="interp.png (one row per path) or .npz")
    _scale_option(p)
    p.set_defaults(fn=commands.cmd_interpolate)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="images -> encoder -> decoder, beside the originals")
    p.add_argument("input", help="images.npz (x, uint8 or [0,1]) or a folder of PNGs")
    _common(p, ENCODER)
    p.add_argument(
        "--decoder", default=DECODER, help=f"decoder graph or models:/NAME@ALIAS ({DECODER})"
    )
    p.add_argument("--n", type=_positive, default=32, help="the first N images (32)")
    p.add_argument("--cols", type=_positive, default=8, help="images per row (8)")
    p.add_argument("--out", required=True, help="recon.png (originals above) or .npz")
    _scale_option(p)
    p.set_defaults(fn=commands.cmd_reconstruct)


def _add_inspection_commands(sub) -> None:
    """score, info, runs, promote, site: how likely images are, what the models are, how the
    runs compare, which model serves, a page to explore them."""
    p = sub.add_parser("score", help="images -> NLL in nats (the likelihood score)")
    p.add_argument("input", help="images.npz (x, uint8 or [0,1]) or a folder of PNGs")
    _common(p, str(paths.SCORER), precision=False)
    # each image costs scorer_k decoder passes: 64 images are ~6,400 rows a call at k = 100
    p.set_defaults(batch_size=64)
    p.add_argument("--out", required=True, help="scores.npz (nll, and y or names)")
    p.set_defaults(fn=commands.cmd_score)

    p = sub.add_parser("info", help="providers, and each model's inputs, opset and metadata")
    p.add_argument(
        "models", nargs="*", help=f"ONNX files (default: {ENCODER} and {DECODER} if present)"
    )
    p.add_argument("--provider", choices=runtime.POLICIES, default="auto")
    p.set_defaults(fn=commands.cmd_info)

    p = sub.add_parser("runs", help="the experiment's MLflow runs side by side, and a plot")
    p.add_argument("--experiment", default="vaepipe", help="MLflow experiment (vaepipe)")
    p.add_argument("--sort", help="metric or param to sort by, e.g. test/nll_iwae")
    p.add_argument("--desc", action="store_true", help="sort in descending order")
    p.add_argument("--params", nargs="+", help="param columns (default: the model/train keys)")
    p.add_argument("--metrics", nargs="+", help="metric columns (default: the test metrics)")
    p.add_argument("--plot", help="also draw the test metrics against --x into this .png")
    p.add_argument("--x", default="model.latent_dim", help="param on the plot's x axis")
    p.add_argument("--hue", help="param drawn as one line per value, e.g. train.beta")
    p.add_argument("--study", help="only the trials of this `vaepipe tune` study")
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("promote", help="move @champion to a better model by a paired NLL test")
    p.add_argument("--model", help="registered decoder (default: params.yaml's decoder_model)")
    p.add_argument(
        "--with",
        dest="with_",
        nargs="*",
        default=[],
        help="registered models that move with the decoder (default: params.yaml's encoder and "
        "scorer, with --model: none)",
    )
    p.add_argument("--version", help="consider only this version of the decoder")
    p.add_argument(
        "--force", action="store_true", help="compare (or with --version: promote) regardless"
    )
    p.add_argument("--dry-run", action="store_true", help="print the table, move no alias")
    p.set_defaults(fn=cmd_promote)
    site.add_parser(sub)
    tuning_command.add_parser(sub)
    literature.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaepipe",
        description="Run an exported VAE with onnxruntime: sample, encode, decode, interpolate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_inspection_commands(sub)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    summary = args.fn(args)
    if summary:
        print(f"{args.command}: {summary} in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
