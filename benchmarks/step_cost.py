"""What one training step costs per architecture and objective, side by side in one run.

Times forward + backward + Adam on one batch of 128 binary 28x28 images for the MLP
(784-512-256-32) and the conv VAE (channels 32, 64; dense 256) with the ELBO and the IWAE
objective (k = 5, 50), and prints ms a step, seconds a Fashion-MNIST epoch (422 steps of
54,000 images) and the ratio to the MLP ELBO step. The README's results section quotes these
ratios: they say which rows fit a CPU budget.

    python benchmarks/step_cost.py                  # all cores this process may use
    python benchmarks/step_cost.py --threads 2 --steps 40
    python benchmarks/step_cost.py --device cuda --conv-variants
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dataclasses  # noqa: E402

import torch  # noqa: E402

from vaepipe import config  # noqa: E402
from vaepipe.model.objectives import sample_terms  # noqa: E402
from vaepipe.model.vae import VAE, VAEConfig  # noqa: E402
from vaepipe.training.distributed import Step  # noqa: E402

STEPS_PER_EPOCH = 422  # ceil(54,000 / 128)
MODEL = config.load(Path(__file__).resolve().parents[1] / "params.yaml").model
MLP = VAEConfig.from_params((1, 28, 28), MODEL)  # params.yaml's: 784-512-256-32
CONV = VAEConfig.from_params((1, 28, 28), dataclasses.replace(MODEL, arch="conv", hidden=[256]))
CASES = [
    ("mlp elbo", MLP, None, ""),
    ("mlp iwae k=5", MLP, 5, ""),
    ("mlp iwae k=50", MLP, 50, ""),
    ("conv elbo", CONV, None, ""),
    ("conv iwae k=5", CONV, 5, ""),
]
# Ways to make the conv step cheaper, timed beside the plain conv step (--conv-variants).
CONV_VARIANTS = [
    ("conv elbo channels_last", CONV, None, "channels_last"),
    ("conv elbo compiled", CONV, None, "compile"),
    ("conv iwae k=5 channels_last", CONV, 5, "channels_last"),
    ("conv iwae k=5 compiled", CONV, 5, "compile"),
]
# bfloat16 autocast (train.precision=bf16; the loss and the optimizer stay float32): pays on
# GPUs and on CPUs with AVX512-BF16 or AMX.
BF16_VARIANTS = [
    ("mlp iwae k=5 bf16", MLP, 5, "bf16"),
    ("conv elbo bf16", CONV, None, "bf16"),
    ("conv elbo bf16 channels_last", CONV, None, "bf16 channels_last"),
    ("conv iwae k=5 bf16", CONV, 5, "bf16"),
    ("conv iwae k=5 bf16 channels_last", CONV, 5, "bf16 channels_last"),
]


def step_seconds(
    cfg: VAEConfig, k: int | None, steps: int, variant: str = "", warmup: int = 3, device="cpu"
) -> float:
    torch.manual_seed(0)
    vae = VAE(cfg).to(device)
    step = Step(vae)
    x = torch.bernoulli(torch.rand(128, *cfg.image_shape, device=device))
    if "channels_last" in variant:
        vae = vae.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if "compile" in variant:
        step = torch.compile(step)
        warmup += 2  # the first calls compile
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled="bf16" in variant)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    opt = torch.optim.Adam(vae.parameters(), foreach=True)
    shape = (k, 128, vae.noise_dim) if k else (128, vae.noise_dim)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with autocast:  # as vaepipe.train does: the model in bf16, the loss in float32
            s = step(x, torch.randn(shape, device=device))
        t = sample_terms(x, s.float(), vae.likelihood, beta=1.0, free_bits=0.0, iwae=bool(k))
        opt.zero_grad(set_to_none=True)
        t.loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case")
    ap.add_argument(
        "--conv-variants",
        action="store_true",
        help="also time the conv step in channels_last memory format, under torch.compile and "
        "in bfloat16 autocast",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    print(f"{where}, torch {torch.__version__}, batch 128, {args.steps} steps a case")
    variants = CONV_VARIANTS + BF16_VARIANTS
    base = None
    for name, cfg, k, variant in CASES + (variants if args.conv_variants else []):
        s = step_seconds(cfg, k, args.steps, variant, device=args.device)
        base = base or s
        print(
            f"{name:14s} {s * 1e3:7.1f} ms/step  {s * STEPS_PER_EPOCH:6.1f} s/epoch  "
            f"{s / base:5.1f}x"
        )


if __name__ == "__main__":
    main()
