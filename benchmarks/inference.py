"""Inference speed of encoder and decoder: torch eager against onnxruntime, in one run.

    python benchmarks/inference.py                          # default-size model (784-512-256-32)
    python benchmarks/inference.py --checkpoint models/vae.pt --seconds 2 --threads 1

Latency p50/p99 per call and throughput (rows/s) at batch 1, 64 and 4096 for torch eager
(inference_mode) and onnxruntime's CPU provider (fp32, int8, fp16 graphs from the export
stage's converters); with a GPU also torch CUDA (fp32, fp16), onnxruntime CUDA (fp32, fp16)
with IO binding, inputs and outputs resident on the device on both sides, and TensorRT (fp16
engines) where the onnxruntime build has it. The scorer (x -> nll with export.scorer_k fixed
samples) is timed at the batches up to export.scorer_max_batch, fp32 only. Each row's
"speed-up" is torch eager's p50 on the same device divided by its p50; "max |err|" is its
largest difference from torch fp32 on CPU. Prints a Markdown table; --json saves the rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vaepipe import config
from vaepipe.device import device_name
from vaepipe.evaluation import likelihood
from vaepipe.export import graphs, variants
from vaepipe.inference import runtime
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE, DecoderMean, VAEConfig


def measure(fn, seconds: float, min_calls: int = 30) -> list[float]:
    """Per-call wall times (s) of fn(), after a warm-up, for about `seconds`."""
    warm_end = time.perf_counter() + min(0.2, seconds / 5)
    for _ in range(3):
        fn()
    while time.perf_counter() < warm_end:
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def torch_runner(module, x: np.ndarray, device: str, half: bool = False):
    """fn() running the module on a device-resident input, and its output as numpy."""
    module = copy.deepcopy(module).to(device)  # .half() and .to() act in place
    xt = torch.from_numpy(x).to(device)
    if half:
        module, xt = module.half(), xt.half()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fn():
        with torch.inference_mode():
            out = module(xt)
        sync()
        return out

    out = fn()
    first = out[0] if isinstance(out, tuple) else out
    return fn, first.float().cpu().numpy()


def ort_runner(path: Path, policy: str, x: np.ndarray):
    """fn() for an onnxruntime session; on CUDA with IO binding (no host copies per call)."""
    sess = runtime.open_session(path, policy)
    name = sess.input_name
    if sess.device == "cpu":
        feeds = {name: x}
        return sess, (lambda: sess.session.run(None, feeds)), sess.session.run(None, feeds)[0]
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    binding = sess.session.io_binding()
    binding.bind_ortvalue_input(name, x_dev)
    first_out = sess.session.get_outputs()[0].name
    out_dev = None
    for o in sess.session.get_outputs():
        shape = (x.shape[0], *o.shape[1:])
        ov = ort.OrtValue.ortvalue_from_shape_and_type(shape, runtime.NP_TYPES[o.type], "cuda", 0)
        binding.bind_ortvalue_output(o.name, ov)
        if o.name == first_out:
            out_dev = ov

    def fn():
        sess.session.run_with_iobinding(binding)

    fn()
    return sess, fn, out_dev.numpy()


PARAMS = config.load(Path(__file__).resolve().parents[1] / "params.yaml")


def scorer_noise(vae: VAE) -> torch.Tensor:
    ex = PARAMS.export
    return likelihood.fixed_noise(ex.scorer_k, vae.noise_dim, ex.scorer_seed)


def export_files(vae: VAE, out_dir: Path) -> dict[str, dict[str, Path]]:
    """{graph: {precision: path}}: encoder and decoder in fp32, fp16 and int8, the scorer fp32."""
    paths = graphs.export_models(
        vae, out_dir, 18, {"dataset": "benchmark"}, scorer_noise(vae), PARAMS.export.scorer_seed
    )
    files = {g: {"fp32": p} for g, p in paths.items()}
    for g in ("encoder", "decoder"):
        files[g]["fp16"] = variants.to_fp16(paths[g], out_dir / f"{g}.fp16.onnx")
        files[g]["int8"] = variants.to_int8(paths[g], out_dir / f"{g}.int8.onnx")
    return files


def _cases(graph, module, files, x, torch_gpu: bool, ort_gpu: bool, trt: bool) -> list:
    """(label, device, fn, output) of every backend that can run this graph here."""
    fn, ref = torch_runner(module, x, "cpu")
    cases = [("torch eager", "cpu", fn, ref)]
    for precision in files[graph]:
        _, fn, out = ort_runner(files[graph][precision], "cpu", x)
        cases.append((f"onnxruntime {precision}", "cpu", fn, out))
    if torch_gpu:
        for half, label in ((False, "torch eager"), (True, "torch eager fp16")):
            fn, out = torch_runner(module, x, "cuda", half)
            cases.append((label, "cuda", fn, out))
    if ort_gpu:
        for precision in [p for p in ("fp32", "fp16") if p in files[graph]]:
            sess, fn, out = ort_runner(files[graph][precision], "cuda", x)
            assert sess.provider == runtime.CUDA, sess.reason
            cases.append((f"onnxruntime {precision}", "cuda", fn, out))
    if trt:
        sess, fn, out = ort_runner(files[graph]["fp32"], "tensorrt", x)
        cases.append(("onnxruntime tensorrt fp16", "cuda", fn, out))
    return cases


def bench(vae: VAE, files, batches, seconds: float, torch_gpu: bool, ort_gpu: bool, trt: bool):
    modules = {
        "encoder": graphs.EncoderGraph(vae).eval(),
        "decoder": DecoderMean(vae).eval(),
        "scorer": graphs.ScorerGraph(vae, scorer_noise(vae)).eval(),
    }
    rng = np.random.default_rng(0)
    rows = []
    for graph, module in modules.items():
        for batch in batches:
            if graph == "scorer" and batch > PARAMS.export.scorer_max_batch:
                continue  # k decoder passes an image: larger batches are not served
            if graph == "decoder":
                x = rng.standard_normal((batch, vae.cfg.latent_dim), dtype=np.float32)
            else:
                x = rng.random((batch, *vae.cfg.image_shape), dtype=np.float32)
            cases = _cases(graph, module, files, x, torch_gpu, ort_gpu, trt)
            ref = cases[0][3]  # torch fp32 on the CPU
            base = {}
            for label, device, fn, out in cases:
                times = measure(fn, seconds)
                p50 = statistics.median(times)
                if label == "torch eager":  # the baseline, first on each device
                    base[device] = p50
                row = {
                    "graph": graph,
                    "batch": batch,
                    "backend": label,
                    "device": device,
                    "p50_ms": p50 * 1e3,
                    "p99_ms": float(np.percentile(times, 99)) * 1e3,
                    "rows_per_s": batch / statistics.fmean(times),
                    "speedup": base[device] / p50 if device in base else float("nan"),
                    "max_abs_err": float(np.abs(out.astype(np.float32) - ref).max()),
                    "calls": len(times),
                }
                rows.append(row)
                print(
                    f"  {graph} b{batch} {label} {device}: p50 {row['p50_ms']:.4f} ms",
                    flush=True,
                )
    return rows


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown NVIDIA GPU"


def machine(gpu: bool) -> str:
    text = (
        f"CPU: {device_name(torch.device('cpu'))} usable; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__} (intra-op threads: "
        f"{os.environ.get('VAEPIPE_ORT_THREADS') or 'one per core'})"
    )
    if gpu:
        text += f"\nGPU: {gpu_name()}"
    return text


def table(rows: list[dict]) -> str:
    head = (
        "| graph | batch | backend | device | p50 ms | p99 ms | rows/s | speed-up vs torch "
        "eager | max abs err |\n|---|---:|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['graph']} | {r['batch']} | {r['backend']} | {r['device']} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rows_per_s']:,.0f} | "
            f"{r['speedup']:.2f}x | {r['max_abs_err']:.1e} |".replace("nanx", "-")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="models/vae.pt (default: a fresh default-size VAE)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per case (1.0)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for both torch and onnxruntime (default: all)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["VAEPIPE_ORT_THREADS"] = str(args.threads)

    if args.checkpoint:
        vae, _ = checkpoint.load(args.checkpoint)
    else:
        torch.manual_seed(0)
        vae = VAE(VAEConfig.from_params((1, 28, 28), PARAMS.model)).eval()  # params.yaml's size
    torch_gpu = torch.cuda.is_available()
    ort_gpu, reason = runtime.cuda_status()
    gpu = torch_gpu or ort_gpu
    trt, trt_reason = runtime.tensorrt_status() if ort_gpu else (False, "")
    with tempfile.TemporaryDirectory() as tmp:
        files = export_files(vae, Path(tmp))
        print(machine(gpu), flush=True)
        rows = bench(vae, files, args.batches, args.seconds, torch_gpu, ort_gpu, trt)
    if not torch_gpu:
        print(f"torch CUDA rows skipped: this torch ({torch.__version__}) sees no GPU")
    if not ort_gpu:
        print(f"onnxruntime CUDA rows skipped: {reason}")
    elif not trt:
        print(f"onnxruntime TensorRT rows skipped: {trt_reason}")
    print()
    print(machine(gpu))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(gpu), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
