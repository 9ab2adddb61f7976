"""The whole GPU path in one command, in under 10 minutes, on a machine with an NVIDIA GPU.

    make gpu-check                      # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out gpu-check.md

1. `dvc repro` end to end in a temp copy of the project with train.device cuda (a few epochs of
   Fashion-MNIST where its IDX files are, else scikit-learn's digits): train and evaluate on
   CUDA, export's parity on onnxruntime's CUDA provider.
2. benchmarks/inference.py on that model: ORT CUDA / TensorRT vs torch CUDA at batch 1, 64 and
   4096, fp32 and fp16, with the scorer, and the ratio to torch eager in the same run.
3. The served decoder on the GPU: `mlflow models serve` with VAEPIPE_PROVIDER=cuda, one
   request answered, and the provider it reports.

Every step must really run on the GPU: a CUDA session that fell back to the CPU fails the
check. The report (Markdown) names the GPU and the date. Without a GPU it ends with one line;
--cpu runs the same steps on the CPU, to try this script itself.

--core runs what needs no DVC or MLflow, for a bare GPU machine without them: the train
stage's loop (vaepipe.training.loop.fit) on CUDA, evaluate's IWAE NLL on CUDA, export's graphs and
their parity on onnxruntime's CUDA provider, benchmarks/inference.py, and
benchmarks/step_cost.py on CUDA (conv variants with bf16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))

import sandbox  # noqa: E402

FAILED = "FAILED:"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sh(cwd: Path, *args: str, env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout + proc.stderr


def project(tmp: Path, device: str) -> Path:
    """A git repo holding a copy of the pipeline with a few-epoch, `device` param set."""
    from vaepipe.data import sources

    fashion = sources._has_all(sources.SYSTEM_DATASET_DIR / "fashion-mnist")
    params = {
        "data.dataset": "fashion-mnist" if fashion else "digits",
        "train.epochs": 3,
        "train.device": device,
        "evaluate.iwae_n": 1000,
        "evaluate.probe_train_size": 2000,
        "export.provider": "cuda" if device == "cuda" else "cpu",
    }
    return sandbox.copy_project(tmp / "project", params)


def step_pipeline(repo: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    out = sh(repo, "dvc", "repro", env=env, timeout=900)
    seconds = time.perf_counter() - t0
    train = json.loads((repo / "metrics/train.json").read_text())
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    ex = json.loads((repo / "metrics/export.json").read_text())
    stages = [
        line for line in out.splitlines() if line.startswith(("train:", "evaluate:", "export:"))
    ]
    dataset = yaml.safe_load((repo / "params.yaml").read_text())["data"]["dataset"]
    return {
        "seconds": seconds,
        "train_device": train["device"],
        "export_provider": ex["provider"],
        "nll": ev["test/nll_iwae"],
        "dataset": dataset,
        "log": stages,
    }


def step_inference(repo: Path, env: dict, tmp: Path) -> str:
    script, model = ROOT / "benchmarks" / "inference.py", repo / "models" / "vae.pt"
    cmd = [sys.executable, str(script), "--checkpoint", str(model), "--seconds", "0.5"]
    out = sh(ROOT, *cmd, env=env, timeout=900)
    return out[out.index("| graph |") :] if "| graph |" in out else out


def step_serve(repo: Path, env: dict, tmp: Path, provider: str) -> dict:
    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    log = tmp / "serve.log"
    serve_env = {**env, "MLFLOW_TRACKING_URI": uri, "VAEPIPE_PROVIDER": provider}
    with sandbox.served("models:/vae-decoder/1", serve_env, log) as url:
        z = [[0.0] * yaml.safe_load((repo / "params.yaml").read_text())["model"]["latent_dim"]]
        req = urllib.request.Request(
            url, json.dumps({"inputs": z}).encode(), {"Content-Type": "application/json"}
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            status = r.status
        ms = (time.perf_counter() - t0) * 1e3
    loaded = next((line for line in log.read_text().splitlines() if "vaepipe: model" in line), "")
    return {"status": status, "first_request_ms": ms, "loaded": loaded}


def step_core(device: str, epochs: int = 3) -> dict:
    """The train stage's loop, evaluate's IWAE NLL and export's parity, in this process."""
    import dataclasses

    import torch

    from vaepipe import config
    from vaepipe.data import arrays, sources
    from vaepipe.errors import DataError
    from vaepipe.evaluation import likelihood
    from vaepipe.export import graphs
    from vaepipe.inference import runtime
    from vaepipe.model.vae import VAE, VAEConfig
    from vaepipe.training.loop import fit

    params = config.load(ROOT / "params.yaml")
    root = str(ROOT / "data" / "raw")
    cfg = dataclasses.replace(params.data, dataset="fashion-mnist", download=False, root=root)
    try:
        sources.locate_idx(cfg)
    except DataError:  # no Fashion-MNIST here (and no network): scikit-learn's digits
        cfg = dataclasses.replace(cfg, dataset="digits")
    dataset = cfg.dataset
    x = {
        name: torch.from_numpy(arrays.to_unit(split.x)).to(device)
        for name, split in sources.prepare_splits(cfg).items()
    }
    torch.manual_seed(params.train.seed)
    shape, n_train = tuple(x["train"].shape[1:]), len(x["train"])
    vae = VAE(VAEConfig.from_params(shape, params.model, n_train=n_train)).to(device)
    train_cfg = dataclasses.replace(params.train, epochs=epochs)
    init = {k: v.clone() for k, v in vae.state_dict().items()}
    history = fit(vae, x["train"], x["val"], train_cfg, params.data.binarize, progress=False)
    compiled: list | str = []  # the same training with its step replayed as CUDA graphs
    if device == "cuda":
        graphed = VAE(vae.cfg).to(device)
        graphed.load_state_dict(init)
        cfg = dataclasses.replace(train_cfg, compile="reduce-overhead")
        try:
            hist = fit(graphed, x["train"], x["val"], cfg, params.data.binarize, progress=False)
            compiled = [round(h.seconds, 2) for h in hist]
        except Exception as e:  # a compiler failure is a finding; the rest of the check runs
            compiled = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    vae.eval()
    test = torch.bernoulli(x["test"][:1000], generator=torch.Generator(device).manual_seed(0))
    t0 = time.perf_counter()
    nll = -likelihood.iwae_log_likelihood(vae, test, 500, seed=0).mean().item()
    nll_s = time.perf_counter() - t0
    ex = params.export
    eps = likelihood.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)
    policy = "cuda" if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as d:
        files = graphs.export_models(
            vae, Path(d), ex.opset, {"dataset": dataset}, eps, ex.scorer_seed
        )
        sessions = {graph: runtime.open_session(f, policy) for graph, f in files.items()}
        errs = graphs.parity_of(vae, sessions, eps)
    return {
        "dataset": dataset,
        "epoch_s": [round(h.seconds, 2) for h in history],
        "compiled_epoch_s": compiled,
        "nll": nll,
        "nll_s": nll_s,
        "providers": sorted({sess.provider for sess in sessions.values()}),
        "parity": {g: max(v for k, v in errs.items() if k.startswith(g)) for g in sessions},
        "atol": {
            g: graphs.SCORER_ATOL_NATS if g == "scorer" else ex.parity_atol for g in sessions
        },
    }


def full_report(device: str, env: dict) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = project(tmp, device)
        pipe = step_pipeline(repo, env)
        if device == "cuda" and not (
            pipe["train_device"].startswith("cuda")
            and pipe["export_provider"] == "CUDAExecutionProvider"
        ):
            fail(
                f"the pipeline did not run on the GPU: train on {pipe['train_device']}, "
                f"export's onnxruntime on {pipe['export_provider']}"
            )
        inference = step_inference(repo, env, tmp)
        serve = step_serve(repo, env, tmp, "cuda" if device == "cuda" else "cpu")
    return [
        f"1. dvc repro ({pipe['dataset']}, 3 epochs): {pipe['seconds']:.0f} s, train on "
        f"{pipe['train_device']}, export parity on {pipe['export_provider']}, test NLL "
        f"{pipe['nll']:.2f} nats",
        *[f"   {line}" for line in pipe["log"]],
        f"2. inference (benchmarks/inference.py on that model):\n\n{inference}",
        f"3. served decoder: HTTP {serve['status']}, first request "
        f"{serve['first_request_ms']:.1f} ms; {serve['loaded']}",
    ]


def core_report(device: str, env: dict) -> list[str]:
    core = step_core(device)
    if device == "cuda" and core["providers"] != ["CUDAExecutionProvider"]:
        fail(f"export's graphs did not all run on CUDA: {core['providers']}")
    parity = ", ".join(
        f"{g} {e:.2g} (atol {core['atol'][g]:g})" for g, e in core["parity"].items()
    )
    bench = ROOT / "benchmarks"
    inference = sh(ROOT, sys.executable, str(bench / "inference.py"), "--seconds", "0.5", env=env)
    cost = [str(bench / "step_cost.py"), "--device", device, "--conv-variants", "--steps", "20"]
    steps = sh(ROOT, sys.executable, *cost, env=env)
    over = [g for g, e in core["parity"].items() if e > core["atol"][g]]
    return [
        f"1. train loop ({core['dataset']}, {len(core['epoch_s'])} epochs on {device}): "
        f"seconds an epoch {core['epoch_s']}; IWAE k=500 NLL of 1,000 test images "
        f"{core['nll']:.2f} nats in {core['nll_s']:.2f} s; export's graphs on "
        f"{core['providers']}, max abs error against PyTorch: {parity}",
        *(
            [f"   train.compile=reduce-overhead: seconds an epoch {core['compiled_epoch_s']}"]
            if core["compiled_epoch_s"]
            else []
        ),
        "2. inference (benchmarks/inference.py, a default-size model):",
        "",
        inference[inference.index("| graph |") :] if "| graph |" in inference else inference,
        "3. step cost (benchmarks/step_cost.py --conv-variants):",
        "",
        *[f"    {line}" for line in steps.strip().splitlines()],
        *([f"{FAILED} parity of {', '.join(over)} over its tolerance"] if over else []),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run the steps on the CPU (try the script)")
    ap.add_argument("--out", help="also write the report to this Markdown file")
    ap.add_argument("--core", action="store_true", help="only the steps that need no DVC/MLflow")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        fail(
            f"torch {torch.__version__} sees no CUDA GPU here; run this on a machine with an "
            "NVIDIA GPU (or --cpu to try the script)"
        )
    device = "cpu" if args.cpu else "cuda"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (--cpu)"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    lines = core_report(device, env) if args.core else full_report(device, env)
    report = "\n".join(
        [
            f"# GPU check{' (--core)' if args.core else ''}, {datetime.date.today()}: {gpu}",
            f"torch {torch.__version__}; total {time.perf_counter() - start:.0f} s",
            "",
            *lines,
        ]
    )
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    if any(line.startswith(FAILED) for line in lines):
        sys.exit(1)


if __name__ == "__main__":
    main()
