"""`vaepipe`: sample, encode, decode, interpolate and inspect exported models with onnxruntime.

No torch at inference: the commands import numpy, onnxruntime and the standard library only
(image files: vaepipe.imagefiles), so `vaepipe generate` starts and finishes in well under a
second on CPU. Every command prints the onnxruntime provider that actually ran.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from vaepipe import imagefiles, limits, paths, runtime, site
from vaepipe.errors import DataError, VaepipeError, exit_on_user_error

ENCODER = str(paths.ENCODER)
DECODER = str(paths.DECODER)
PRECISIONS = ("auto", "fp32", "fp16", "int8")


# --- sessions and reporting --------------------------------------------------------------------


def _variant(model: Path, precision: str) -> Path:
    return model.with_name(f"{model.stem}.{precision}{model.suffix}")


def _fp16_fits(path: Path) -> bool:
    """Did the export stage find this fp16 graph within export.fp16_parity_atol?"""
    import onnx

    try:
        meta = onnx.load(str(path), load_external_data=False).metadata_props
    except Exception:  # noqa: BLE001 - unreadable: the fp32 graph serves instead
        return False
    return any(p.key == "parity_ok" and p.value == "True" for p in meta)


def _open(args) -> runtime.Session:
    """The session of --model (or its --precision variant) on --provider. `auto` precision:
    on a GPU the fp16 variant when it exists and its parity was within tolerance, else fp32."""
    path = Path(args.model)
    precision = getattr(args, "precision", "fp32")
    if precision not in ("auto", "fp32"):
        path = _variant(path, precision)
        if not path.is_file():
            raise VaepipeError(
                f"--precision {precision} needs {path}, which does not exist; the export "
                "stage writes it (dvc repro export)"
            )
    sess = runtime.open_session(path, args.provider)
    fp16 = _variant(path, "fp16")
    if precision == "auto" and sess.device == "cuda" and fp16.is_file() and _fp16_fits(fp16):
        path, sess = fp16, runtime.open_session(fp16, args.provider)
    print(f"onnxruntime: {path} on {sess.provider} ({sess.reason})")
    return sess


def _check_out(out: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(out)
    if path.suffix not in suffixes:
        raise VaepipeError(f"--out {out}: the file name must end in {' or '.join(suffixes)}")
    return path


def _latent_dim(sess: runtime.Session) -> int:
    shape = sess.input_shape()
    if len(shape) != 2 or shape[1] is None:
        raise VaepipeError(f"{sess.path} takes input shape {list(shape)}, not [batch, latent_dim]")
    return shape[1]


def _labels(sess: runtime.Session, n: int, label: int | None, arrays: dict | None = None) -> dict:
    """{"y": one-hot [n, n_classes]} for a conditional model's graph (input `y`), from --label
    or the labels `y` of the input file; {} for an unconditional one."""
    inputs = {i.name: i for i in sess.session.get_inputs()}
    if "y" not in inputs:
        if label is not None:
            raise VaepipeError(f"--label {label}: {sess.path} is not conditional (no input y)")
        return {}
    classes = inputs["y"].shape[1]
    if label is not None:
        if not 0 <= label < classes:
            raise VaepipeError(
                f"--label {label} is not a class of {sess.path}: "
                f"it has {classes} (0..{classes - 1})"
            )
        y = np.full(n, label)
    elif arrays is not None and "y" in arrays:
        y = np.asarray(arrays["y"])
    else:
        raise VaepipeError(
            f"{sess.path} is conditional: pass --label L (0..{classes - 1}) or labels y in "
            "the file"
        )
    if y.shape != (n,) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= classes:
        got = f"{y.dtype} {y.shape}" + (f", values {y.min()}..{y.max()}" if y.size else "")
        raise DataError(
            f"labels y of the file must be {n} integers in 0..{classes - 1}, got {got}"
        )
    return {"y": np.eye(classes, dtype=np.float32)[y]}


def _check_decoded(what: str, rows: int, sess: runtime.Session, out: Path, cols: int) -> None:
    """Before decoding: `rows` latents and their images fit in memory, and in a PNG grid."""
    image = [d if isinstance(d, int) else 1 for d in sess.session.get_outputs()[0].shape[1:]]
    hint = "ask for fewer, or split the work over several calls"
    limits.check_rows(what, rows, 4 * (math.prod(image) + _latent_dim(sess)), hint)
    if out.suffix == ".png":
        imagefiles.check_grid(what, rows, cols, image)


# --- commands --------------------------------------------------------------------------------


def cmd_generate(args) -> str:
    out = _check_out(args.out, (".png", ".npz"))
    sess = _open(args)
    cols = args.cols or int(np.ceil(np.sqrt(args.n)))
    _check_decoded("--n", args.n, sess, out, cols)
    rng = np.random.default_rng(args.seed)
    eps = args.temperature * rng.standard_normal((args.n, _latent_dim(sess)), dtype=np.float32)
    u = rng.random(args.n, dtype=np.float32)
    prior = Path(args.prior) if args.prior else Path(args.model).with_name("prior.onnx")
    if args.prior != "none" and prior.is_file():  # the learned prior, as the model was trained
        prior_sess = runtime.open_session(prior, args.provider)
        z = prior_sess.run({"eps": eps, "u": u})[0]
        kind = prior_sess.metadata().get("prior", "?")
    elif args.prior not in (None, "none"):
        raise VaepipeError(f"--prior {args.prior} does not exist")
    else:
        z, kind = eps, "standard (N(0, I))"
    extra = _labels(sess, args.n, args.label)
    x = sess.run_batched(z, args.batch_size, extra)[sess.output_names[0]]
    imagefiles.save_images(out, x, cols, {"z": z})
    given = f", label {args.label}" if args.label is not None else ""
    return f"{args.n} samples (seed {args.seed}{given}) of the {kind} prior -> {out}"


def _images(sess: runtime.Session, src: Path) -> tuple[np.ndarray, dict]:
    """The images of an npz or a PNG folder, checked for the session's input (float32 in
    [0, 1]), and what travels with them into the output (labels y, or the file names)."""
    shape = sess.input_shape()[1:]
    if src.is_dir():
        x, names = imagefiles.read_png_folder(src, shape)
        extra = {"names": np.array(names)}
    else:
        x, extra = imagefiles.images_from_npz(src, shape)
    return sess.check(x, value_range=(0.0, 1.0)), extra


def cmd_encode(args) -> str:
    out = _check_out(args.out, (".npz",))
    sess = _open(args)
    src = Path(args.input)
    x, extra = _images(sess, src)
    res = sess.run_batched(x, args.batch_size, _labels(sess, len(x), args.label, extra))
    imagefiles.write_file(out, {**res, **extra})
    return f"{len(x)} images from {src} -> {out} ({', '.join(res)})"


def cmd_decode(args) -> str:
    out = _check_out(args.out, (".png", ".npz"))
    sess = _open(args)
    keys = (args.key,) if args.key else ("z", "mu")
    key, z, arrays = imagefiles.load_npz(Path(args.latents), keys)
    z = sess.check(z)
    cols = args.cols or int(np.ceil(np.sqrt(len(z))))
    _check_decoded(f"the latents in {args.latents}", len(z), sess, out, cols)
    extra = _labels(sess, len(z), args.label, arrays)
    x = sess.run_batched(z, args.batch_size, extra)[sess.output_names[0]]
    imagefiles.save_images(out, x, cols, {"z": z})
    return f"{len(z)} latents ('{key}' of {args.latents}) -> {out}"


def _path_between(a: np.ndarray, b: np.ndarray, steps: int, method: str) -> np.ndarray:
    """[steps, D] from a to b: straight (lerp) or along the great circle (slerp)."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    if method == "slerp":
        cos = np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
        omega = np.arccos(np.clip(cos, -1.0, 1.0))
        if omega > 1e-4:
            s = np.sin(omega)
            return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / s
    return (1 - t) * a + t * b


def cmd_interpolate(args) -> str:
    out = _check_out(args.out, (".png", ".npz"))
    sess = _open(args)
    dim = _latent_dim(sess)
    n_paths = 1 if args.latents else args.pairs
    what = "--steps" if args.latents else "--pairs x --steps"
    _check_decoded(what, n_paths * args.steps, sess, out, args.steps)
    if args.latents:
        _, z, _ = imagefiles.load_npz(Path(args.latents), ("z", "mu"))
        z = sess.check(z)
        a, b = args.index
        for i in (a, b):
            if not 0 <= i < len(z):
                raise DataError(f"--index {i} is outside {args.latents}'s {len(z)} rows")
        ends = [(z[a], z[b])]
    else:
        rng = np.random.default_rng(args.seed)
        e = rng.standard_normal((args.pairs, 2, dim), dtype=np.float32)
        ends = [(p[0], p[1]) for p in e]
    path = np.stack([_path_between(a, b, args.steps, args.method) for a, b in ends])
    z_all = path.reshape(-1, dim).astype(np.float32)
    extra = _labels(sess, len(z_all), args.label)
    x = sess.run_batched(z_all, args.batch_size, extra)[sess.output_names[0]]
    imagefiles.save_images(out, x, args.steps, {"z": path.astype(np.float32)})
    return f"{len(ends)} x {args.steps} {args.method} path(s) -> {out}"


def cmd_info(args) -> str:
    import onnxruntime as ort

    providers = ", ".join(ort.get_available_providers())
    print(f"onnxruntime {ort.__version__}; providers in this build: {providers}")
    usable, reason = runtime.cuda_status()
    print(f"CUDA provider: {'usable' if usable else 'not usable'} ({reason})")
    models = [Path(m) for m in args.models] or [p for p in map(Path, (ENCODER, DECODER))]
    for path in models:
        if not args.models and not path.is_file():
            continue
        sess = runtime.open_session(path, args.provider)
        print(f"\n{path}: {path.stat().st_size / 1e6:.2f} MB, opset {_opset(path)}")
        print(f"  runs on {sess.provider} ({sess.reason})")
        for kind, values in (
            ("input ", sess.session.get_inputs()),
            ("output", sess.session.get_outputs()),
        ):
            for v in values:
                dims = ", ".join(str(d) for d in v.shape)
                print(f"  {kind} {v.name}: {v.type} [{dims}]")
        for k, v in sorted(sess.metadata().items()):
            print(f"  {k}: {v}")
    return ""


def cmd_runs(args) -> str:
    from vaepipe import compare  # MLflow is imported only by this command

    runs = compare.sort_runs(compare.load_runs(args.experiment), args.sort, args.desc)
    params = args.params or compare.DEFAULT_PARAMS
    metrics = args.metrics or compare.DEFAULT_METRICS
    print(compare.format_table(runs, params, metrics))
    if args.plot:
        ys = [m for m in args.metrics if m.startswith("test/")] if args.metrics else None
        ys = ys or list(compare.PLOT_METRICS)
        compare.comparison_plot(runs, _check_out(args.plot, (".png",)), args.x, ys, args.hue)
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
    from vaepipe import promotion, tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise VaepipeError(f"no MLflow store at {uri}: run the pipeline first (dvc repro)")
    tracking.setup_uri()
    decoder, companions = _registered_names() if args.model is None else (args.model, args.with_)
    champion, rows, winner = promotion.decide(decoder, args.version, args.force)
    print(f"MLflow store {uri}, registered model {decoder}")
    print(promotion.format_table(rows, champion))
    live = [r for r in rows if not r.decision.startswith("skipped")]
    newest = live[-1] if live else None
    if args.dry_run:
        return f"dry run: would move @champion to {f'v{winner.version}' if winner else 'nothing'}"
    moved = promotion.move(decoder, companions if winner else [], winner, newest)
    if winner is None and champion is not None:
        moved.insert(0, f"{decoder}@champion stays v{champion.version}")
    return "; ".join(moved) or "nothing to promote"


def cmd_score(args) -> str:
    out = _check_out(args.out, (".npz",))
    sess = _open(args)
    src = Path(args.input)
    x, extra = _images(sess, src)
    shape = x.shape[1:]
    nll = sess.run_batched(x, args.batch_size, _labels(sess, len(x), args.label, extra))["nll"]
    imagefiles.write_file(out, {"nll": nll, **extra})
    meta = sess.metadata()
    bits = nll / (math.prod(shape) * math.log(2))
    q = np.percentile(nll, [5, 50, 95])
    print(
        f"score: NLL of {len(nll)} images (IWAE, k = {meta.get('scorer_k', '?')} fixed samples): "
        f"mean {nll.mean():.2f} nats ({bits.mean():.4f} bits/dim), median {q[1]:.2f}, "
        f"5-95% {q[0]:.2f}..{q[2]:.2f}; highest {nll.max():.2f} (image {int(nll.argmax())})"
    )
    test = meta.get("test_nll_iwae")
    if test:
        print(f"score: the model's own test images: {float(test):.2f} nats on average")
    return f"{len(nll)} images from {src} -> {out}"


def _opset(path: Path) -> str:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common type
        return f"unknown ({e})"
    return ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)


# --- argument parsing --------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def _common(p: argparse.ArgumentParser, model: str, precision: bool = True) -> None:
    p.add_argument("--model", default=model, help=f"ONNX graph (default: {model})")
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
    p.add_argument("--seed", type=int, default=0, help="seed of z (0)")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="std of z (1.0)")
    p.add_argument("--cols", type=_positive, help="grid columns (default: ~sqrt(n))")
    p.add_argument("--out", required=True, help="grid.png (image grid) or samples.npz (z, x_mean)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("encode", help="images -> mu, logvar")
    p.add_argument(
        "input", help="images.npz (x [N,H,W] or [N,C,H,W], uint8 or [0,1]) or a PNG folder"
    )
    _common(p, ENCODER)
    p.add_argument("--out", required=True, help="latents.npz (mu, logvar, and y or names)")
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("decode", help="latents -> images")
    p.add_argument("latents", help=".npz with z [N, latent_dim] (or mu, as encode writes)")
    _common(p, DECODER)
    p.add_argument("--key", help="array to decode (default: z, else mu)")
    p.add_argument("--cols", type=_positive, help="grid columns (default: ~sqrt(N))")
    p.add_argument("--out", required=True, help="grid.png or images.npz (z, x_mean)")
    p.set_defaults(fn=cmd_decode)

    p = sub.add_parser("interpolate", help="decode paths between latent points")
    _common(p, DECODER)
    p.add_argument("--steps", type=_positive, default=10, help="points per path (10)")
    p.add_argument("--pairs", type=_positive, default=4, help="random endpoint pairs (4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random endpoints (0)")
    p.add_argument("--latents", help=".npz (z or mu) to take the endpoints from, with --index")
    p.add_argument("--index", type=int, nargs=2, default=(0, 1), metavar=("A", "B"))
    p.add_argument(
        "--method", choices=("slerp", "lerp"), default="slerp", help="path shape (slerp)"
    )
    p.add_argument("--out", required=True, help="interp.png (one row per path) or .npz")
    p.set_defaults(fn=cmd_interpolate)


def _add_inspection_commands(sub) -> None:
    """score, info, runs, promote, site: how likely images are, what the models are, how the
    runs compare, which model serves, a page to explore them."""
    p = sub.add_parser("score", help="images -> NLL in nats (the likelihood score)")
    p.add_argument("input", help="images.npz (x, uint8 or [0,1]) or a folder of PNGs")
    _common(p, str(paths.SCORER), precision=False)
    # each image costs scorer_k decoder passes: 64 images are ~6,400 rows a call at k = 100
    p.set_defaults(batch_size=64)
    p.add_argument("--out", required=True, help="scores.npz (nll, and y or names)")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("info", help="providers, and each model's inputs, opset and metadata")
    p.add_argument(
        "models", nargs="*", help=f"ONNX files (default: {ENCODER} and {DECODER} if present)"
    )
    p.add_argument("--provider", choices=runtime.POLICIES, default="auto")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("runs", help="the experiment's MLflow runs side by side, and a plot")
    p.add_argument("--experiment", default="vaepipe", help="MLflow experiment (vaepipe)")
    p.add_argument("--sort", help="metric or param to sort by, e.g. test/nll_iwae")
    p.add_argument("--desc", action="store_true", help="sort in descending order")
    p.add_argument("--params", nargs="+", help="param columns (default: the model/train keys)")
    p.add_argument("--metrics", nargs="+", help="metric columns (default: the test metrics)")
    p.add_argument("--plot", help="also draw the test metrics against --x into this .png")
    p.add_argument("--x", default="model.latent_dim", help="param on the plot's x axis")
    p.add_argument("--hue", help="param drawn as one line per value, e.g. train.beta")
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
