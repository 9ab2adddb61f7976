"""The README results table, from the DVC experiments of this repo and their MLflow runs.

Run the rows as `dvc exp run --queue -n NAME -S ...` (the commands are in README, Results),
`dvc queue start -j 1` (one at a time, so the training times are those of the whole machine),
then print the table in Markdown:

    python benchmarks/results_table.py                 # every experiment of the HEAD commit
    python benchmarks/results_table.py --names mlp-elbo conv-elbo
    python benchmarks/results_table.py --baseline mlp-elbo   # paired differences against it

Each row names its experiment and the params it changes from params.yaml, so `dvc exp run`
with those `-S` flags reproduces it. Training seconds come from the MLflow run (train_seconds;
wall time is kept out of DVC outputs), with the machine's core count beside them. FID is the
evaluate stage's `test/fid` (samples of the model's own prior). With --baseline, each row also
gets its mean per-image NLL difference to that row on the same test images and the standard
error of that paired difference (vaepipe.tracking.promotion, the gate of `vaepipe promote`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vaepipe import tracking  # noqa: E402


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _params(rev: dict) -> dict:
    return _flatten(rev["data"]["params"]["params.yaml"]["data"])


def _metrics(rev: dict, name: str) -> dict:
    """metrics/<name> as the experiment committed it (DVC lists only metrics/summary.json as
    metrics; the other files are plain outputs, kept in the experiment's git commit)."""
    proc = subprocess.run(
        ["git", "show", f"{rev['rev']}:metrics/{name}"], capture_output=True, text=True
    )
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def experiments(names: list[str] | None, all_commits: bool = False) -> list[tuple]:
    """[(name, params changed from its commit's, train.json, evaluate.json)]: the experiments
    of the HEAD commit, or of every commit."""
    dvc = Path(sys.executable).parent / "dvc"  # the project's DVC, also without an activated venv
    cmd = [str(dvc) if dvc.is_file() else "dvc", "exp", "show", "--json"]
    try:
        proc = subprocess.run(
            cmd + (["--all-commits"] if all_commits else []), capture_output=True, text=True
        )
    except FileNotFoundError:
        sys.exit("error: no `dvc` here: run `make install`, then use .venv/bin/python")
    if proc.returncode != 0:
        sys.exit(f"error: `dvc exp show` failed: {proc.stderr.strip()[-500:]}")
    commits = [c for c in json.loads(proc.stdout) if c["rev"] != "workspace"]
    rows = []
    for head in commits if all_commits else commits[:1]:
        base = _params(head)
        for exp in head.get("experiments") or []:
            rev = exp["revs"][0]
            name = rev.get("name") or exp.get("name")
            if rev.get("error") or not rev.get("data") or (names and name not in names):
                continue
            ev = _metrics(rev, "evaluate.json")
            if "test/nll_iwae" not in ev:
                continue
            params = _params(rev)
            changed = {k: v for k, v in params.items() if base.get(k) != v}
            if params.get("train.objective") == "iwae":  # k is the point of the row: show it
                changed.setdefault("train.iwae_k", params["train.iwae_k"])
            rows.append((name, changed, _metrics(rev, "train.json"), ev))
    if names:
        rows.sort(key=lambda r: names.index(r[0]))
    return rows


def paired_to(rows, baseline: str | None) -> dict[str, str]:
    """{experiment: 'diff ± stderr'} against the baseline row, from the runs' per-image NLLs."""
    if not baseline:
        return {}
    from vaepipe.tracking import promotion, registry

    def nll(train):
        return promotion.per_image_nll(train.get("run_id", ""), registry.download)

    tracking.setup_uri()  # the project's store (its artifacts hold the per-image NLLs)
    base = next((train for name, _, train, _ in rows if name == baseline), None)
    if base is None:
        sys.exit(f"error: --baseline {baseline} is not one of the experiments shown")
    ref = nll(base)
    out = {}
    for name, _, train, _ in rows:
        p = promotion.paired_difference(nll(train), ref)
        out[name] = "0" if name == baseline else f"{p.diff:+.2f} ± {p.stderr:.2f}"
    return out


def train_seconds(run_id: str) -> float | None:
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking.tracking_uri()).get_run(run_id)
    except Exception:  # a run from another store: leave the cell empty
        return None
    return run.data.metrics.get("train_seconds")


def _value(v) -> str:
    """As one writes it after -S: strings bare, lists without spaces."""
    return v if isinstance(v, str) else json.dumps(v).replace(" ", "")


def table(rows, paired: dict[str, str]) -> str:
    lines = [
        "| experiment | params (`-S`) | epochs (best) | train min | NLL (IWAE) "
        f"{'| vs baseline ' if paired else ''}| ELBO | active | probe | FID |",
        f"|---|---|---|---|---|{'---|' if paired else ''}---|---|---|---|",
    ]
    for name, changed, train, ev in rows:
        shown = {k: v for k, v in changed.items() if not k.startswith("evaluate.")}
        flags = " ".join(f"`{k}={_value(v)}`" for k, v in shown.items())
        secs = train_seconds(train.get("run_id", ""))
        nll = (
            f"{ev['test/nll_iwae']:.2f} ± {ev['test/nll_iwae_stderr']:.2f} "
            f"(k={ev['iwae_k']}, n={ev.get('iwae_n', ev['n_test'])})"
        )
        probe, fid = ev.get("test/probe_accuracy"), ev.get("test/fid")
        vs = f"| {paired[name]} " if paired else ""
        lines.append(
            f"| {name} | {flags or '(defaults)'} | {train.get('epochs')} "
            f"({train.get('best_epoch', train.get('epochs'))}) "
            f"| {'' if secs is None else f'{secs / 60:.1f}'} | {nll} {vs}| {ev['test/elbo']:.2f} "
            f"| {ev['test/active_units']} | {'' if probe is None else f'{probe:.3f}'} "
            f"| {'' if fid is None else f'{fid:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", nargs="*", help="experiments to show, in this order")
    ap.add_argument("--baseline", help="experiment the paired NLL differences are taken against")
    ap.add_argument(
        "--all-commits", action="store_true", help="experiments of every commit, not only HEAD's"
    )
    args = ap.parse_args()
    rows = experiments(args.names, args.all_commits)
    if not rows:
        sys.exit("error: no finished DVC experiment with metrics/evaluate.json on this commit")
    print(f"{os.cpu_count()} CPU cores; NLL in nats on the first n test images\n")
    print(table(rows, paired_to(rows, args.baseline)))
    protocols = {
        (ev["iwae_k"], ev.get("iwae_n", ev["n_test"]), ev.get("data_digest")) for *_, ev in rows
    }
    if len(protocols) > 1:
        print(
            "\nnote: these NLLs were measured under different protocols (k, n, test draw); "
            "compare only rows with the same k and n"
        )


if __name__ == "__main__":
    main()
