"""IWAE throughput: vaepipe.evaluation.likelihood.iwae_log_likelihood against a bare PyTorch loop.

Both compute the same per-example sums (log p(x|z) + log p(z) - log q(z|x), logsumexp over k)
with the same model, k, chunking and noise, so the figures differ only by our overhead.
Prints examples x k per second for each, side by side, and their ratio (target: ours >= 0.9x).

    python benchmarks/evaluate.py                       # 784-512-256-32, k=500, 1000 examples
    python benchmarks/evaluate.py --model models/vae.pt --n 10000
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vaepipe import config
from vaepipe.device import set_threads
from vaepipe.evaluation import likelihood
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE, VAEConfig


@torch.no_grad()
def bare_iwae(vae: VAE, x: torch.Tensor, k: int, seed: int, rows: int) -> torch.Tensor:
    """The same estimate written out inline: Bernoulli likelihood, N(0, I) prior."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    chunk = max(1, rows // k)
    out = []
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        mu, logvar = vae.encoder(xb)  # [B, D]
        eps = torch.randn((k, *mu.shape), generator=gen, device=x.device)  # [K, B, D]
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = vae.decoder.net(z)  # [K, B, P]
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, xb.flatten(1).expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(-1)
        out.append(torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k))
    return torch.cat(out)


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    result = fn()
    if result.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="test examples")
    ap.add_argument("--k", type=int, default=500, help="importance samples per example")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved")
    ap.add_argument("--model", default="", help="models/vae.pt; default: a fresh 784-512-256-32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    ap.add_argument("--rows", type=int, default=0, help="k x examples per op; 0 = our default")
    args = ap.parse_args()

    threads = set_threads(args.threads)
    device = torch.device(args.device)
    if args.model:
        vae, _ = checkpoint.load(args.model, device)
    else:
        torch.manual_seed(0)
        model = config.load(Path(__file__).resolve().parents[1] / "params.yaml").model
        vae = VAE(VAEConfig.from_params((1, 28, 28), model))  # the size params.yaml trains
        vae = vae.to(device).eval()
    assert vae.cfg.likelihood == "bernoulli", "the bare loop is written for a Bernoulli model"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((args.n, *vae.cfg.image_shape), generator=gen, device=device).bernoulli(
        generator=gen
    )
    rows = args.rows or likelihood.IWAE_ROWS_PER_CHUNK.get(device.type, 2048)

    def ours():
        return likelihood.iwae_log_likelihood(vae, x, args.k, seed=0, rows_per_chunk=rows)

    def bare():
        return bare_iwae(vae, x, args.k, 0, rows)

    timed(ours)  # warm-up: allocator, kernels, thread pool
    # Interleaved, and the best run of each counted (as timeit does): load from other processes
    # only ever slows a run down, so the fastest is the closest to the code's own speed.
    times: dict[str, list[float]] = {"vaepipe": [], "bare": []}
    results: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, fn in (("vaepipe", ours), ("bare", bare)):
            seconds, results[name] = timed(fn)
            times[name].append(seconds)
    diff = (results["vaepipe"] - results["bare"]).abs().max().item()

    work = args.n * args.k
    rate = {name: work / min(t) for name, t in times.items()}
    print(
        f"IWAE on {device} ({threads} threads), model {vae.cfg.hidden} latent "
        f"{vae.cfg.latent_dim}, {args.n} examples x k={args.k}, {rows} rows per op, "
        f"best of {args.repeats}:"
    )
    for name, t in times.items():
        print(
            f"  {name:8s} {rate[name]:>12,.0f} examples*k/s  "
            f"({min(t):.2f} s; runs {', '.join(f'{s:.2f}' for s in t)})"
        )
    print(
        f"  ratio vaepipe/bare {rate['vaepipe'] / rate['bare']:.3f} (target >= 0.9); "
        f"max |difference| {diff:.2e} nats"
    )
    nll = -results["vaepipe"].mean().item()
    print(
        f"  full test set (10k) at this rate: {10_000 * args.k / rate['vaepipe']:.0f} s; "
        f"NLL here {nll:.2f} nats"
    )


if __name__ == "__main__":
    main()
