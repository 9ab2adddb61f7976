"""Is model A's test NLL really below model B's? A paired comparison on the same test images.

Every row of the results table is measured on the same first n test images with the same
binarization, so the difference of two rows is paired: its standard error comes from the
per-image differences, and is far smaller than the ± of each row (which is the spread of the
images' NLLs). This script scores each model file on those images exactly as the evaluate
stage does (pipeline/evaluate.py's test set and IWAE estimator, same seeds) and prints each
NLL and the paired differences against the first model, computed by vaepipe.tracking.promotion (the
gate of `vaepipe promote`, which pairs the NLLs the evaluate stage logged instead).

    dvc exp apply mlp-elbo && cp models/vae.pt /tmp/mlp-objectives.pt   # one file per experiment
    python benchmarks/paired_nll.py /tmp/mlp-objectives.pt /tmp/best.pt --k 500 --n 1000
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from vaepipe.errors import exit_on_user_error  # noqa: E402
from vaepipe.evaluation import likelihood  # noqa: E402
from vaepipe.evaluation.report import load_test  # noqa: E402
from vaepipe.model import checkpoint  # noqa: E402
from vaepipe.tracking import promotion  # noqa: E402


def per_image_nll(model: Path, k: int, n: int, seed: int) -> torch.Tensor:
    vae, _ = checkpoint.load(model, "cpu")
    inp = load_test(vae, torch.device("cpu"), seed)
    return -likelihood.iwae_log_likelihood(vae, inp.x[:n], k, seed=seed).double()


@exit_on_user_error
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="models/vae.pt files; the first is B")
    ap.add_argument("--k", type=int, default=500, help="importance samples (evaluate.iwae_k)")
    ap.add_argument("--n", type=int, default=1000, help="first n test images (evaluate.iwae_n)")
    ap.add_argument("--seed", type=int, default=0, help="evaluate.seed")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    nlls = {m: per_image_nll(m, args.k, args.n, args.seed) for m in args.models}
    base_name, base = args.models[0], nlls[args.models[0]]
    print(f"IWAE k={args.k} on the first {len(base)} test images of data/prepared/test.npz")
    for m, v in nlls.items():
        line = f"{m}: NLL {v.mean():.2f} ± {v.std() / math.sqrt(len(v)):.2f} nats"
        if m != base_name:
            p = promotion.paired_difference(v.numpy(), base.numpy())  # what promote uses
            line += (
                f"; minus {base_name}: {p.diff:+.2f} ± {p.stderr:.2f} "
                f"(paired; lower on {p.better:.0%} of the images)"
            )
        print(line)


if __name__ == "__main__":
    main()
