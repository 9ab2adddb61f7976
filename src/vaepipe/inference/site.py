"""`vaepipe site`: a static latent explorer of decoder.onnx that runs in the browser.

The site is the page (index.html, app.js, sampling.js, style.css: package data in vaepipe/web),
the decoder (and its fp16 variant for WebGPU, when the export stage wrote one), model.json (what
the page needs: contract, model card, latent dims ordered by activity) and onnxruntime-web's
runtime files, copied from the npm package `make web` pins (never a CDN): it works offline
behind any static server (`python -m http.server`). The decoder's contract is checked at build
time (vaepipe.export.contract), so a model the page cannot run never becomes a site.

numpy, onnx and the standard library only (no torch, no matplotlib), like the rest of the CLI.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from vaepipe import paths
from vaepipe.errors import VaepipeError
from vaepipe.export.contract import read_decoder

DECODER = str(paths.DECODER)
KL_PER_DIM = str(paths.KL_PER_DIM)
RUNTIME_DIR = "web/node_modules/onnxruntime-web/dist"
# ort.webgpu.min.mjs holds both the WebGPU and the WASM execution providers; it loads the
# asyncify build of the WASM runtime next to it (the other dist files are never fetched).
RUNTIME_FILES = (
    "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm",
)
PAGE_FILES = ("index.html", "app.js", "sampling.js", "style.css")
GENERATOR = "vaepipe site"  # marks a folder this command built, so a rebuild may replace it
# The files a build wrote, listed in the folder: a rebuild replaces those and keeps the rest.
MANIFEST = ".vaepipe-site.json"


class SiteError(VaepipeError):
    pass


# --- what the page shows -----------------------------------------------------------------------


def _number(meta: dict[str, str], *keys: str) -> float | None:
    for k in keys:
        try:
            value = float(meta[k])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


def model_card(meta: dict[str, str]) -> dict[str, str]:
    """The card's rows as text; a figure the metadata lacks is 'n/a'."""
    nll = _number(meta, "test_nll_iwae")
    k = _number(meta, "test_nll_iwae_k", "iwae_k")
    n = _number(meta, "test_nll_iwae_n", "iwae_n")
    nll_text = "n/a"
    if nll is not None:
        how = ", ".join(f"{s}={v:.0f}" for s, v in (("k", k), ("n", n)) if v is not None)
        nll_text = f"{nll:.2f} nats" + (f" (IWAE, {how})" if how else " (IWAE)")
    rows = {"dataset": meta.get("dataset"), "likelihood": meta.get("likelihood"), "nll": nll_text}
    for key in ("run_id", "git_commit", "opset", "precision"):
        rows[key] = meta.get("mlflow_run_id" if key == "run_id" else key)
    return {k: v or "n/a" for k, v in rows.items()}


def _kl_rows_from_file(path: Path, latent_dim: int) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SiteError(f"--kl-per-dim {path}: cannot read it as JSON ({e})") from None
    keys = {"dim", "kl", "activity", "active"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and keys <= set(r) for r in rows):
        raise SiteError(
            f"--kl-per-dim {path}: expected a list of {{dim, kl, activity, active}} rows, as the "
            "evaluate stage writes"
        )
    dims = sorted(r["dim"] for r in rows)
    if dims != list(range(latent_dim)):
        raise SiteError(
            f"--kl-per-dim {path} has {len(rows)} rows (dims {dims[:3]}...) but the decoder has "
            f"latent_dim {latent_dim}: is it from another model?"
        )
    fields = (("dim", int), ("kl", float), ("activity", float), ("active", bool))
    return [{key: cast(r[key]) for key, cast in fields} for r in rows]


def _kl_from_meta(meta: dict[str, str], latent_dim: int) -> list[float] | None:
    """Per-dim KL from metadata `kl_per_dim` (a JSON list or comma-separated), if it fits."""
    text = meta.get("kl_per_dim", "").strip()
    if not text:
        return None
    try:
        values = json.loads(text) if text.startswith("[") else text.split(",")
        values = [float(v) for v in values]
    except (ValueError, TypeError):
        return None
    return values if len(values) == latent_dim else None


def latent_dims(meta: dict[str, str], latent_dim: int, kl_path: Path | None) -> dict:
    """The sliders' dims in display order, whether each is active, and where that came from.

    Evaluate's kl_per_dim.json orders by activity (Cov_x E_q[z_d]) and says which dims are active
    (the rest go behind a toggle); the metadata's per-dim KL alone orders by KL and hides none;
    with neither, all dims in index order.
    """
    if kl_path is not None:
        rows = _kl_rows_from_file(kl_path, latent_dim)
        rows.sort(key=lambda r: (-r["activity"], r["dim"]))
        n_active = sum(r["active"] for r in rows)
        note = f"{n_active} of {latent_dim} dims active, ordered by activity ({kl_path.name})"
        return {"rows": rows, "hide_inactive": True, "source": str(kl_path), "note": note}
    kl = _kl_from_meta(meta, latent_dim)
    if kl is not None:
        rows = [{"dim": d, "kl": k, "activity": None, "active": True} for d, k in enumerate(kl)]
        rows.sort(key=lambda r: (-r["kl"], r["dim"]))
        note = "ordered by per-dim KL from the model's metadata (no activity figures: all shown)"
        return {"rows": rows, "hide_inactive": False, "source": "metadata", "note": note}
    rows = [{"dim": d, "kl": None, "activity": None, "active": True} for d in range(latent_dim)]
    note = f"no per-dim KL given ({KL_PER_DIM} not found): all dims in index order"
    return {"rows": rows, "hide_inactive": False, "source": None, "note": note}


def prior_sample(seed: int, n: int, dim: int, temperature: float = 1.0) -> np.ndarray:
    """The page's z [n, dim] for `seed`: mulberry32 uniforms (seed taken mod 2^32) turned into
    N(0, 1) pairs by Box-Muller, row-major, times `temperature`, as float32. The uniforms are
    exact; log/cos/sin of V8 and of the C library may differ in a double's last bit, so a float32
    can (rarely) differ by one ulp."""
    mask = 0xFFFFFFFF
    state = seed & mask

    def uniform() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & mask
        t = ((state ^ (state >> 15)) * (state | 1)) & mask
        t = ((t + (((t ^ (t >> 7)) * (t | 61)) & mask)) & mask) ^ t
        return ((t ^ (t >> 14)) & mask) / 2**32

    out = np.empty(n * dim, np.float64)
    for i in range(0, n * dim, 2):
        r = math.sqrt(-2.0 * math.log(1.0 - uniform()))
        angle = 2.0 * math.pi * uniform()
        out[i] = r * math.cos(angle)
        if i + 1 < len(out):
            out[i + 1] = r * math.sin(angle)
    return (temperature * out).astype(np.float32).reshape(n, dim)


# --- building the folder -----------------------------------------------------------------------


def runtime_files(runtime_dir: Path) -> tuple[list[Path], str]:
    """onnxruntime-web's files to copy and its version; SiteError naming `make web` if absent."""
    missing = [f for f in RUNTIME_FILES if not (runtime_dir / f).is_file()]
    if missing:
        raise SiteError(
            f"onnxruntime-web runtime files missing in {runtime_dir} ({', '.join(missing)}): "
            "run `make web` (npm ci --prefix web) first"
        )
    try:
        version = json.loads((runtime_dir.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        version = "unknown"
    return [runtime_dir / f for f in RUNTIME_FILES], version


def _site_files(fp16: bool) -> list[str]:
    """The files a build writes (but its manifest), as paths relative to the folder."""
    models = ("decoder.onnx", "decoder.fp16.onnx") if fp16 else ("decoder.onnx",)
    return [*PAGE_FILES, *models, "model.json", *(f"ort/{f}" for f in RUNTIME_FILES)]


def _generated(path: Path) -> dict | None:
    """The JSON object in `path`, if this command wrote it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _old_files(out: Path) -> list[str]:
    """The files an earlier build of `out` wrote that are still there, from its manifest (a
    rebuild replaces them, and only them); refuses a folder this command did not build (e.g.
    --out . by mistake)."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise SiteError(f"--out {out} exists and is not a folder")
    listed = (_generated(out / MANIFEST) or {}).get("files")
    if isinstance(listed, list):
        listed = [*listed, MANIFEST]
    elif _generated(out / "model.json") is not None:
        listed = _site_files(fp16=True)  # a site built before builds listed their files
    elif any(out.iterdir()):
        raise SiteError(
            f"--out {out} exists and is not a site `vaepipe site` built; remove it or choose "
            "another folder"
        )
    else:
        return []
    real, known = out.resolve(), [*_site_files(fp16=True), MANIFEST]
    ours = [f for f in known if f in listed and (out / f).is_file()]
    return [f for f in ours if (out / f).resolve() == real / f]  # not one reached by a link


def _check_clashes(out: Path, old: list[str], new: list[str]) -> None:
    """Refuse to write over anything in `out` the earlier build did not write."""
    dirs = {PurePosixPath(f).parent.as_posix() for f in new} - {"."}
    clashes = [d for d in dirs if (out / d).is_symlink() or (out / d).is_file()]
    clashes += [f for f in new if os.path.lexists(out / f) and f not in old]
    if clashes:
        raise SiteError(
            f"--out {out} holds {', '.join(sorted(clashes))}, which no earlier build wrote and "
            "this one would replace: move it away"
        )


def _stage(new: Path, decoder: Path, fp16: Path | None, runtime: list[Path], config) -> None:
    """The whole site in the folder `new`, with the manifest of what it holds."""
    (new / "ort").mkdir(parents=True)
    page = resources.files("vaepipe.inference") / "web"
    for name in PAGE_FILES:
        (new / name).write_bytes((page / name).read_bytes())
    shutil.copyfile(decoder, new / "decoder.onnx")
    if fp16 is not None:
        shutil.copyfile(fp16, new / "decoder.fp16.onnx")
    for src in runtime:
        shutil.copyfile(src, new / "ort" / src.name)
    (new / "model.json").write_text(json.dumps(config, indent=2) + "\n")
    manifest = {"generator": GENERATOR, "files": _site_files(fp16 is not None)}
    (new / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _swap(work: Path, out: Path, old: list[str], new: list[str]) -> None:
    """Put the site staged in work/new in place of the earlier build's files, which go to
    work/old: all of them or none (a failure, Ctrl-C included, moves them back). Nothing else
    in `out` is touched."""
    staged, trash = work / "new", work / "old"
    if not out.exists():
        os.replace(staged, out)
        return
    moves = [(out / f, trash / f) for f in old] + [(staged / f, out / f) for f in new]
    done, made = [], []
    try:
        for src, dst in moves:
            if not dst.parent.is_dir():
                dst.parent.mkdir(parents=True)
                made.append(dst.parent)
            done.append((src, dst))  # before: an interrupt may come just after the rename
            os.replace(src, dst)
    except BaseException:
        for src, dst in reversed(done):
            if os.path.lexists(dst):
                os.replace(dst, src)
        for folder in reversed(made):
            folder.rmdir()
        raise
    shutil.rmtree(trash)


def build_site(out: Path, decoder: Path, runtime_dir: Path, kl_path: Path | None = None) -> dict:
    """Write the site into a temp folder beside `out`, then swap it in for the files an earlier
    build wrote (the manifest lists them); other files in `out` stay, and a failure leaves `out`
    as it was. Returns model.json's content."""
    info = read_decoder(decoder)
    fp16 = decoder.with_name(f"{decoder.stem}.fp16{decoder.suffix}")
    fp16 = fp16 if fp16.is_file() else None
    if fp16 is not None:
        read_decoder(fp16)  # same contract (keep_io_types: float32 in and out)
    runtime, version = runtime_files(runtime_dir)
    old, new = _old_files(out), [*_site_files(fp16 is not None), MANIFEST]
    _check_clashes(out, old, new)
    config = _config(info, fp16 is not None, version, kl_path)
    work = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        real = out.resolve()  # the temp folder beside it: on its file system, outside it
        work = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
        _stage(work / "new", decoder, fp16, runtime, config)
        _swap(work, out, old, new)
    except OSError as e:
        raise SiteError(f"--out {out}: cannot write the site ({e})") from None
    finally:
        if work and not any(p.is_file() for p in (work / "old").rglob("*")):  # else: undo failed
            shutil.rmtree(work)
    return config


def _config(info, fp16: bool, version: str, kl_path: Path | None) -> dict:
    """model.json: what the page needs to run the decoder and to show it."""
    module = f"ort/{RUNTIME_FILES[0]}"
    return {
        "generator": GENERATOR,
        "input": "z",
        "output": "x_mean",
        "latent_dim": info.latent_dim,
        "image_shape": list(info.image_shape),
        "models": {"fp32": "decoder.onnx", "fp16": "decoder.fp16.onnx" if fp16 else None},
        "card": model_card(info.metadata),
        "dims": latent_dims(info.metadata, info.latent_dim, kl_path),
        "runtime": {"package": "onnxruntime-web", "version": version, "module": module},
    }


# --- command line ------------------------------------------------------------------------------


def cmd_site(args) -> str:
    kl_path = Path(args.kl_per_dim) if args.kl_per_dim else Path(KL_PER_DIM)
    if args.kl_per_dim is None and not kl_path.is_file():
        kl_path = None  # the default is optional; an explicit path must exist
    elif not kl_path.is_file():
        raise SiteError(f"--kl-per-dim {kl_path} does not exist (the evaluate stage writes it)")
    run_id = _run_to_log(args.log_run) if args.log_run else None  # before the build
    out = Path(args.out)
    config = build_site(out, Path(args.decoder), Path(args.runtime), kl_path)
    fp16 = " + fp16" if config["models"]["fp16"] else ""
    if run_id:
        log_to_run(out, run_id, _site_files(fp16=bool(fp16)))
    logged = f"; logged to MLflow run {run_id} as site/" if run_id else ""
    return (
        f"{args.decoder}{fp16} + onnxruntime-web {config['runtime']['version']} -> {out}/ "
        f"(serve it: python -m http.server --directory {out}){logged}"
    )


def _run_to_log(run_id: str) -> str:
    """The id of the MLflow run --log-run names (the pipeline's own, from metrics/train.json,
    for "train"), once the store has it."""
    from vaepipe import tracking
    from vaepipe.fileio import read_json

    if run_id == "train":
        if not paths.TRAIN_METRICS.is_file():
            raise SiteError(f"--log-run needs {paths.TRAIN_METRICS} (run the pipeline) or an id")
        run_id = read_json(paths.TRAIN_METRICS)["run_id"]
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SiteError(f"--log-run: no MLflow store at {uri} (set MLFLOW_TRACKING_URI)")
    tracking.setup_uri()
    import mlflow

    tracking.call(lambda: mlflow.MlflowClient().get_run(run_id), f"looking up run {run_id}")
    return run_id


def log_to_run(out: Path, run_id: str, files: list[str]) -> None:
    """The site's `files` in `out` as the artifacts site/ of MLflow run `run_id` (`mlflow
    artifacts download -r RUN -a site` gives anyone with the store the page). The run is left
    as it is: its status and end time are the training's, whatever state it is in."""
    import mlflow

    from vaepipe import tracking

    client = mlflow.MlflowClient()
    for f in files:
        where = PurePosixPath("site", f).parent.as_posix()
        tracking.call(
            lambda f=f, where=where: client.log_artifact(run_id, str(out / f), where),
            f"uploading {out / f} to run {run_id}",
        )


def add_parser(sub) -> None:
    p = sub.add_parser("site", help="a static web page that decodes samples in the browser")
    p.add_argument("--out", default="site", help="folder to write (default: site)")
    p.add_argument("--decoder", default=DECODER, help=f"decoder ONNX (default: {DECODER})")
    p.add_argument(
        "--kl-per-dim",
        help=f"evaluate's per-dim KL/activity rows for the sliders (default: {KL_PER_DIM} "
        "when present)",
    )
    p.add_argument(
        "--runtime",
        default=RUNTIME_DIR,
        help=f"onnxruntime-web's dist folder (default: {RUNTIME_DIR}, made by `make web`)",
    )
    p.add_argument(
        "--log-run",
        nargs="?",
        const="train",
        metavar="RUN_ID",
        help="also log the folder to an MLflow run's artifacts as site/ (default run: the "
        "pipeline's, from metrics/train.json)",
    )
    p.set_defaults(fn=cmd_site)
