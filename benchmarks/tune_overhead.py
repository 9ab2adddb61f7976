"""What `vaepipe tune` adds to each trial beyond the trial itself.

Two sandbox copies of the project (digits, `--epochs` epochs), each run once (`dvc repro`,
untimed). In one, the trials as plain `dvc exp run -n NAME -S train.lr=... evaluate` calls,
half before and half after the other side (so drift of the machine falls on both); in the
other, the same learning rates through `vaepipe tune` (enqueued, pruning off, so both run the
same trials whole). Printed: the wall time of each side and the seconds per trial the engine
adds (Optuna's sampler and database, the study's MLflow run, reading each objective back, the
summary and its pictures).

    python benchmarks/tune_overhead.py --trials 4 --epochs 6
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts")]

import sandbox  # noqa: E402

TINY = {"data.dataset": "digits", "model.hidden": [32], "model.latent_dim": 4,
        "train.batch_size": 64, "evaluate.iwae_k": 8}  # fmt: skip


def timed(cwd: Path, *argv: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    lrs = [0.002 * (i + 1) for i in range(args.trials)]
    overrides = {**TINY, "train.epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="vaepipe-tune-bench-") as tmp:
        direct = sandbox.copy_project(Path(tmp) / "direct", overrides)
        tuned = sandbox.copy_project(Path(tmp) / "tuned", overrides)
        for repo in (direct, tuned):  # the pipeline once, outside the timing
            timed(repo, "dvc", "repro")

        def plain_trials(part) -> float:
            return sum(
                timed(direct, "dvc", "exp", "run", "-n", f"d-{i}", "-S", f"train.lr={lrs[i]}",
                      "evaluate")
                for i in part
            )  # fmt: skip

        half = len(lrs) // 2
        plain = plain_trials(range(half))
        study = {
            "study": "bench",
            "trials": args.trials,
            "pruning": {"enabled": False},
            "enqueue": [{"train.lr": lr} for lr in lrs],
            "space": {"train.lr": {"low": 0.001, "high": 0.05}},
        }
        (tuned / "tune.yaml").write_text(yaml.safe_dump(study))
        engine = timed(tuned, "vaepipe", "tune")
        plain += plain_trials(range(half, len(lrs)))
    extra = (engine - plain) / args.trials
    print(f"trials: {args.trials} of {args.epochs} epochs on digits (2-core figures: docs)")
    print(f"dvc exp run, one per trial: {plain:.1f} s ({plain / args.trials:.1f} s a trial)")
    print(f"vaepipe tune, same trials:  {engine:.1f} s ({engine / args.trials:.1f} s a trial)")
    print(f"overhead: {extra:.1f} s a trial ({100 * extra / (plain / args.trials):.0f}%)")


if __name__ == "__main__":
    main()
