"""The `vaepipe` commands that run the exported graphs: generate, encode, decode, interpolate,
score and info. onnxruntime, numpy, Pillow and the standard library only (no torch), so
`vaepipe generate` starts and finishes in well under a second on a CPU; every command prints the
onnxruntime provider that actually ran. The argument parser is vaepipe.cli.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vaepipe import imagefiles, limits, paths
from vaepipe.errors import DataError, VaepipeError
from vaepipe.inference import runtime

ENCODER = str(paths.ENCODER)
DECODER = str(paths.DECODER)
DEFAULTS = (ENCODER, DECODER, str(paths.SCORER))


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


# The graphs the export stage writes, told apart by their inputs and first output (docs/onnx.md)
ROLES = {
    "decoder": (("z",), "x_mean"),
    "encoder": (("x",), "mu"),
    "scorer": (("x",), "nll"),
    "prior": (("eps", "u"), "z"),
}


def check_role(sess: runtime.Session, role: str, option: str = "--model") -> runtime.Session:
    """`sess` when its graph is a `role` (an encoder where a decoder goes would run, or fail
    deep inside onnxruntime, on the wrong numbers); else one line naming what it is."""

    def role_of(s: runtime.Session) -> str | None:
        names = tuple(i.name for i in s.session.get_inputs() if i.name != "y")
        return next((r for r, (i, o) in ROLES.items() if i == names and o in s.output_names), None)

    found = role_of(sess)
    if found != role:
        inputs, output = ROLES[role]
        what = (
            f"{'an' if found[0] in 'aeiou' else 'a'} {found}"
            if found
            else ("not a graph the export stage writes")
        )
        raise VaepipeError(
            f"{option} {sess.path} is {what}; this command needs the {role} (inputs "
            f"{', '.join(inputs)} -> {output})"
        )
    return sess


def _local_model(args) -> Path:
    """--model as a local file: a path, or a registered version (models:/NAME@ALIAS,
    models:/NAME/VERSION) fetched from the MLflow store into a temp folder for this command,
    with its run's prior graph beside it (generate uses it)."""
    if not str(args.model).startswith("models:/"):
        path = Path(args.model)
        if not path.is_file() and str(path) in DEFAULTS:
            raise VaepipeError(
                f"{path} does not exist here: run this in a project whose pipeline has run "
                "(dvc repro), or pass --model FILE.onnx or --model models:/NAME@champion"
            )
        return path
    import atexit
    import shutil
    import tempfile

    from vaepipe import tracking
    from vaepipe.tracking import registry

    tracking.setup_existing_uri()
    folder = Path(tempfile.mkdtemp(prefix="vaepipe-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    graph, prior, what = registry.fetch_graph(args.model, folder)
    if prior is not None:
        shutil.move(prior, graph.with_name("prior.onnx"))
    print(f"registry: {args.model} is {what}")
    return graph


def _open(args, role: str) -> runtime.Session:
    """The session of --model (or its --precision variant) on --provider, checked to be the
    `role` graph. `auto` precision: on a GPU the fp16 variant when it exists and its parity
    was within tolerance, else fp32. Says where it runs (why, with --verbose)."""
    path = _local_model(args)
    args.model = str(path)
    precision = getattr(args, "precision", "fp32")
    if precision not in ("auto", "fp32"):
        path = _variant(path, precision)
        if not path.is_file():
            raise VaepipeError(
                f"--precision {precision} needs {path}, which does not exist; the export "
                "stage writes it (dvc repro export)"
            )
    sess = check_role(runtime.open_session(path, args.provider), role)
    fp16 = _variant(path, "fp16")
    if precision == "auto" and sess.device == "cuda" and fp16.is_file() and _fp16_fits(fp16):
        path, sess = fp16, runtime.open_session(fp16, args.provider)
    why = f" ({sess.reason})" if getattr(args, "verbose", False) else ""
    print(f"onnxruntime: {path} on {sess.provider}{why}")
    return sess


def check_out(out: str, suffixes: tuple[str, ...]) -> Path:
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


def _check_decoded(args, what: str, rows: int, sess: runtime.Session, cols: int) -> int:
    """Before decoding: `rows` latents and their images fit in memory, and in a PNG grid at
    --scale (or the readable default); that scale."""
    image = [d if isinstance(d, int) else 1 for d in sess.session.get_outputs()[0].shape[1:]]
    hint = "ask for fewer, or split the work over several calls"
    limits.check_rows(what, rows, 4 * (math.prod(image) + _latent_dim(sess)), hint)
    scale = args.scale or imagefiles.readable_scale(rows, cols, image)
    if Path(args.out).suffix == ".png":
        imagefiles.check_grid(what, rows, cols, image, scale)
    return scale


# --- commands --------------------------------------------------------------------------------


def cmd_generate(args) -> str:
    out = check_out(args.out, (".png", ".npz"))
    sess = _open(args, "decoder")
    cols = args.cols or int(np.ceil(np.sqrt(args.n)))
    scale = _check_decoded(args, "--n", args.n, sess, cols)
    rng = np.random.default_rng(args.seed)
    eps = args.temperature * rng.standard_normal((args.n, _latent_dim(sess)), dtype=np.float32)
    u = rng.random(args.n, dtype=np.float32)
    prior = Path(args.prior) if args.prior else Path(args.model).with_name("prior.onnx")
    if args.prior != "none" and prior.is_file():  # the learned prior, as the model was trained
        prior_sess = check_role(runtime.open_session(prior, args.provider), "prior", "--prior")
        z = prior_sess.run({"eps": eps, "u": u})[0]
        kind = prior_sess.metadata().get("prior", "?")
    elif args.prior not in (None, "none"):
        raise VaepipeError(f"--prior {args.prior} does not exist")
    else:
        z, kind = eps, "standard (N(0, I))"
        learned = sess.metadata().get("prior", "standard")
        if learned != "standard":
            print(f"note: {sess.path} was trained with a {learned} prior, drawn here from N(0, I)")
    extra = _labels(sess, args.n, args.label)
    x = sess.run_batched(z, args.batch_size, extra)[sess.output_names[0]]
    imagefiles.save_images(out, x, cols, {"z": z}, scale)
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
    out = check_out(args.out, (".npz",))
    sess = _open(args, "encoder")
    src = Path(args.input)
    x, extra = _images(sess, src)
    res = sess.run_batched(x, args.batch_size, _labels(sess, len(x), args.label, extra))
    imagefiles.write_file(out, {**res, **extra})
    return f"{len(x)} images from {src} -> {out} ({', '.join(res)})"


def cmd_decode(args) -> str:
    out = check_out(args.out, (".png", ".npz"))
    sess = _open(args, "decoder")
    keys = (args.key,) if args.key else ("z", "mu")
    key, z, arrays = imagefiles.load_npz(Path(args.latents), keys)
    z = sess.check(z)
    cols = args.cols or int(np.ceil(np.sqrt(len(z))))
    scale = _check_decoded(args, f"the latents in {args.latents}", len(z), sess, cols)
    extra = _labels(sess, len(z), args.label, arrays)
    x = sess.run_batched(z, args.batch_size, extra)[sess.output_names[0]]
    imagefiles.save_images(out, x, cols, {"z": z}, scale)
    return f"{len(z)} latents ('{key}' of {args.latents}) -> {out}"


def cmd_reconstruct(args) -> str:
    """Images through the encoder (mu) and back through the decoder: each row of originals
    above its reconstructions, the rows named, at a readable scale (or an .npz)."""
    import copy

    out = check_out(args.out, (".png", ".npz"))
    enc = _open(args, "encoder")
    dec_args = copy.copy(args)
    dec_args.model = args.decoder
    dec = _open(dec_args, "decoder")
    src = Path(args.input)
    x, extra = _images(enc, src)
    x = x[: args.n]
    labels = _labels(enc, len(x), args.label, {k: v[: args.n] for k, v in extra.items()})
    mu = enc.run_batched(x, args.batch_size, labels)["mu"]
    recon = dec.run_batched(mu, args.batch_size, labels)[dec.output_names[0]]
    cols = min(args.cols, len(x))
    if out.suffix == ".npz":
        imagefiles.write_file(out, {"x": x, "mu": mu, "x_mean": recon})
    else:
        pairs = imagefiles.interleave_rows(x, recon, cols)
        scale = args.scale or imagefiles.readable_scale(len(pairs), cols, x.shape[1:])
        imagefiles.save_images(out, pairs, cols, {}, scale, rows=["input", "recon."])
    return f"{len(x)} images from {src} and their reconstructions -> {out}"


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
    out = check_out(args.out, (".png", ".npz"))
    sess = _open(args, "decoder")
    dim = _latent_dim(sess)
    n_paths = 1 if args.latents else args.pairs
    what = "--steps" if args.latents else "--pairs x --steps"
    scale = _check_decoded(args, what, n_paths * args.steps, sess, args.steps)
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
    imagefiles.save_images(out, x, args.steps, {"z": path.astype(np.float32)}, scale)
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


def cmd_score(args) -> str:
    out = check_out(args.out, (".npz",))
    sess = _open(args, "scorer")
    src = Path(args.input)
    x, extra = _images(sess, src)
    shape = x.shape[1:]
    # an Exemplar-prior model's graph records the most images one run may take
    most = sess.metadata().get("max_batch", "")
    rows = min(args.batch_size, int(most)) if most.isdigit() and int(most) > 0 else args.batch_size
    nll = sess.run_batched(x, rows, _labels(sess, len(x), args.label, extra))["nll"]
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
