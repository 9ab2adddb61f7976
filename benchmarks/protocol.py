"""The literature's protocol (IWAE, k = 5,000 per test image): torch against onnxruntime.

    python benchmarks/protocol.py                            # vae-vamp's model, fresh weights
    python benchmarks/protocol.py --configuration hvae-standard --images 40 --threads 2
    python benchmarks/protocol.py --checkpoint models/vae.pt
    python benchmarks/protocol.py --configuration vae-exemplar --images 4 --batches  # torch

Times the per-image estimate of -log p(x) with k importance samples, in one run, on the same
images: torch as the evaluate stage runs it (`likelihood.iwae_log_likelihood`, its CPU
chunks), and onnxruntime's CPU provider on scorer.onnx exported with the same k (its noise a
constant of the graph), one request per --batches size. Each is warmed up, then timed
--repeats times in turn (the median counts). Prints images/s, the time the 10,000 test images
would take, each speed over torch's, and the largest difference between the two on the same
noise (nats). Images: data/prepared/test.npz when there is one, else random
binary images (the speed does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vaepipe import config
from vaepipe.device import device_name
from vaepipe.evaluation import likelihood
from vaepipe.export import graphs
from vaepipe.inference import runtime
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE, VAEConfig
from vaepipe.tracking import literature

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = literature.TEST_IMAGES
TRAIN_IMAGES = 50_000  # the recipe's split of Fashion-MNIST's 60,000


def model(args) -> VAE:
    if args.checkpoint:
        vae, _ = checkpoint.load(args.checkpoint)
        return vae.eval()
    cell = literature.cell(args.configuration)
    raw = config.to_dict(config.load(ROOT / "params.yaml"))
    sets = [f"{k}={literature.param_text(v)}" for k, v in cell.params.items()]
    params = config.from_dict(config.with_sets(raw, sets))
    torch.manual_seed(0)
    n_train = TRAIN_IMAGES  # an Exemplar prior's exemplars: the recipe's training images
    return VAE(VAEConfig.from_params((1, 28, 28), params.model, n_train=n_train)).eval()


def images(n: int) -> torch.Tensor:
    test = ROOT / "data" / "prepared" / "test.npz"
    if test.is_file():
        with np.load(test) as f:
            x = torch.from_numpy(f["x"][:n].astype(np.float32))
        return torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.2), generator=torch.Generator())


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configuration", default="vae-vamp", help="a literature configuration")
    parser.add_argument("--checkpoint", help="models/vae.pt instead of fresh weights")
    parser.add_argument("--k", type=int, default=literature.PROTOCOL_K, help="samples (5000)")
    parser.add_argument("--images", type=int, default=32, help="test images timed (32)")
    parser.add_argument(
        "--batches", type=int, nargs="*", default=[1, 8, 32], help="none: torch alone"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timings of each, in turn (3)")
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["VAEPIPE_ORT_THREADS"] = str(args.threads)
    vae, x = model(args), images(args.images)
    n = len(x)
    eps = likelihood.fixed_noise(args.k, vae.noise_dim, 0)
    print(f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} torch threads")
    print(f"model: {vae.cfg.arch}, prior {vae.cfg.prior}; k = {args.k}, {n} images\n")

    runs = {
        "torch (evaluate stage)": lambda: likelihood.iwae_log_likelihood(vae, x, args.k, seed=0)
    }
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.batches:
            exported = graphs.export_models(vae, Path(tmp), 18, {"dataset": "benchmark"}, eps, 0)
            sess = runtime.open_session(exported["scorer"], "cpu").session
            want = -likelihood.fixed_noise_log_likelihood(vae, x, eps).numpy()
        for b in args.batches:
            xs = [x[i : i + b].numpy() for i in range(0, n, b)]
            label = f"onnxruntime scorer, batch {b}"
            runs[label] = lambda xs=xs: np.concatenate([sess.run(None, {"x": xb})[0] for xb in xs])
            errors[label] = float(np.abs(runs[label]() - want).max())  # also the warm-up
        likelihood.iwae_log_likelihood(vae, x[:1], args.k, seed=0)  # torch's warm-up
        times = {label: [] for label in runs}
        for _ in range(args.repeats):
            for label, fn in runs.items():
                times[label].append(timed(fn)[0])
    seconds = {label: statistics.median(t) for label, t in times.items()}
    t_torch = seconds["torch (evaluate stage)"]
    rows = [(label, seconds[label], errors.get(label)) for label in runs]

    print("| estimator | images/s | 10,000 test images | speed vs torch | max diff, nats |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, err in rows:
        full = seconds / n * TEST_IMAGES
        diff = "" if err is None else f"{err:.1e}"
        print(
            f"| {label} | {n / seconds:.2f} | {full / 60:.1f} min | {t_torch / seconds:.2f}x "
            f"| {diff} |"
        )


if __name__ == "__main__":
    main()
