"""A short training run of one configuration and its IWAE NLL: the probe that picks what is worth
a 30-minute run.

Trains with `vaepipe.training.loop.fit` on the prepare stage's splits (data/prepared/*.npz) with
params.yaml and `-S section.key=value` overrides (YAML values, validated as `dvc exp run -S`
is), then prints one JSON line: seconds an epoch, the IWAE NLL of the best epoch's weights (nats,
`--k` samples, the first `--n` test images, binarized with seed 0 for a Bernoulli model), the
best epoch and its validation ELBO. Conditional models are refused (their NLL is
-log p(x|y)). Two probes with `--threads 1` side by side share a 2-core machine fairly; compare
probes of the same length (a probe of 12 epochs ranks long runs only roughly: README, results).
It trains where `train.device` says (auto: CUDA where torch sees a GPU, as the train stage
does); a GPU runs whole-length probes, several processes at once on one card, and the NLL of a
full run, `--k 500`, is then that run's to about 0.15 nats (README, results).

    python benchmarks/probe.py --epochs 12 -S model.prior=vamp -S model.prior_components=100 \
        -S train.objective=iwae -S train.lr_schedule=cosine -S train.precision=bf16 \
        -S model.activation=elu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import yaml  # noqa: E402

from vaepipe import config  # noqa: E402
from vaepipe.data import arrays  # noqa: E402
from vaepipe.device import resolve_device  # noqa: E402
from vaepipe.errors import VaepipeError  # noqa: E402
from vaepipe.evaluation import likelihood  # noqa: E402
from vaepipe.model.vae import VAE, VAEConfig  # noqa: E402
from vaepipe.training.loop import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="probe", help="label of the JSON line")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=200, help="importance samples of the NLL")
    ap.add_argument("--n", type=int, default=1000, help="first n test images")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    ap.add_argument("-S", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        p = config.from_dict(config.with_sets(raw, [*args.sets, f"train.epochs={args.epochs}"]))
        if p.model.conditional:
            raise VaepipeError(
                "model.conditional=true is not probed: its NLL is -log p(x|y), which does not "
                "rank against the unconditional rows"
            )
        splits = {k: arrays.load_split(args.data / f"{k}.npz") for k in ("train", "val", "test")}
        dev = resolve_device(p.train.device)  # auto: CUDA where torch sees a GPU, as train does
    except (VaepipeError, OSError) as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    x = {k: torch.from_numpy(arrays.to_unit(v.x)).to(dev) for k, v in splits.items()}
    torch.manual_seed(p.train.seed)
    # fit starts a VampPrior's pseudo-inputs from the data
    shape, n_train = x["train"].shape[1:], len(x["train"])
    vae = VAE(VAEConfig.from_params(shape, p.model, n_train=n_train)).to(dev)
    t0 = time.perf_counter()
    hist = fit(vae, x["train"], x["val"], p.train, p.data.binarize, progress=False)
    seconds = time.perf_counter() - t0
    vae.eval()
    # measured as the evaluate stage does: one fixed Bernoulli draw for a Bernoulli model
    test = x["test"][: args.n].cpu()
    if p.model.likelihood == "bernoulli":
        test = arrays.binarize(test, torch.Generator().manual_seed(0))  # the same draw anywhere
    test = test.to(dev)
    with torch.no_grad():
        nll = -likelihood.iwae_log_likelihood(vae, test, args.k, seed=0).mean().item()
    best = hist[-1].best_epoch
    row = {
        "name": args.name,
        "sets": args.sets,
        "epochs": args.epochs,
        "threads": args.threads,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "epoch_seconds": round(seconds / len(hist), 1),
        f"nll_k{args.k}_n{args.n}": round(nll, 2),  # of the best epoch's weights (fit keeps them)
        "best_epoch": best,
        "val_elbo": round(hist[best - 1].val["elbo"], 2),  # the best epoch's
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
