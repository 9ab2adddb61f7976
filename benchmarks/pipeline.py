"""Wall time and peak memory of each DVC stage, and of a `dvc repro` that has nothing to do.

Works in a temp copy of the project (a fresh git repo with its own MLflow store), so the real
project's outputs, dvc.lock and mlruns/ are never touched. Each stage runs through
`dvc repro --single-item <stage>` as a user would run it; a small sitecustomize hook, active only
in that copy, records each stage process's own wall time, peak RSS (its and its children's) and,
when it used CUDA through torch, peak GPU memory (torch's allocator). Then a no-change
`dvc repro` is timed (best of --repeats; target < 5 s).

    python benchmarks/pipeline.py                                    # params.yaml's defaults
    python benchmarks/pipeline.py --set train.epochs=2 --set evaluate.iwae_k=100
    python benchmarks/pipeline.py --set train.epochs=2 --nproc 2     # train under torchrun
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]

import sandbox  # noqa: E402

from vaepipe import config  # noqa: E402
from vaepipe.errors import ConfigError  # noqa: E402

# Imported by every Python process started with this directory on PYTHONPATH: at exit it appends
# {argv, seconds, peak RSS, peak GPU memory} to $VAEPIPE_BENCH_LOG.
SITECUSTOMIZE = """
import atexit, json, os, resource, sys, time

_t0 = time.perf_counter()


def _report():
    usage = (resource.getrusage(r) for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    rss = max(u.ru_maxrss for u in usage)  # KiB
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = torch.cuda.max_memory_allocated()
    with open(os.environ["VAEPIPE_BENCH_LOG"], "a") as f:
        f.write(json.dumps({"argv": sys.argv, "seconds": time.perf_counter() - _t0,
                            "rss_kib": rss, "gpu_bytes": gpu}) + "\\n")


atexit.register(_report)
"""


def make_copy(repo: Path, params: dict, nproc: int) -> None:
    """The project's pipeline in `repo` as a fresh git repo, with the params mapping `params`
    (and the train stage run under torchrun with `nproc` processes when nproc > 1)."""
    sandbox.copy_project(repo, message="benchmark copy")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if nproc > 1:
        dvc_yaml = repo / "dvc.yaml"
        stages = yaml.safe_load(dvc_yaml.read_text())
        stages["stages"]["train"]["cmd"] = (
            f"torchrun --standalone --nproc_per_node {nproc} pipeline/train.py"
        )
        dvc_yaml.write_text(yaml.safe_dump(stages, sort_keys=False))
    # --allow-empty: params.yaml's defaults, as the copy already holds them, change nothing
    subprocess.run(
        ["git", *sandbox.GIT_IDENTITY, "commit", "-qam", "its params", "--allow-empty"],
        cwd=repo,
        check=True,
    )


def stage_names(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def dvc(repo: Path, env: dict[str, str], *args: str) -> float:
    """Run `dvc <args>` in repo; its wall time in seconds (fails loudly, with its output)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def stage_records(log: Path, start: int, stage: str) -> dict:
    """Max seconds, peak RSS and peak GPU memory over the processes that ran
    pipeline/<stage>.py, among the hook's records from line `start` on (under torchrun: the
    launcher and every rank)."""
    lines = log.read_text().splitlines()[start:] if log.exists() else []
    mine = [json.loads(line) for line in lines]
    mine = [r for r in mine if any(a.endswith(f"pipeline/{stage}.py") for a in r["argv"])]
    return {
        key: max((r[key] for r in mine if r[key] is not None), default=None)
        for key in ("seconds", "rss_kib", "gpu_bytes")
    }


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores usable"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed no-change `dvc repro` runs")
    ap.add_argument(
        "--nproc", type=int, default=1, help="train with torchrun, this many processes (1: no)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp copy and print its path")
    args = ap.parse_args()
    overrides = args.set
    try:
        params = config.with_sets(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    except ConfigError as e:
        raise SystemExit(f"error: --set {e}") from None

    tmp = Path(tempfile.mkdtemp(prefix="vaepipe-bench-"))
    repo, hook = tmp / "project", tmp / "hook"
    repo.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp / "processes.jsonl"
    make_copy(repo, params, args.nproc)
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    plain["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{plain['PATH']}"
    hooked = dict(plain, VAEPIPE_BENCH_LOG=str(log))
    hooked["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), plain.get("PYTHONPATH")]))
    try:
        rows = []
        t_all = time.perf_counter()
        for stage in stage_names(repo):
            start = n_lines(log)
            seconds = dvc(repo, hooked, "repro", "--single-item", stage)
            rec = stage_records(log, start, stage)
            rows.append(
                (stage, seconds, rec.get("seconds"), rec.get("rss_kib"), rec.get("gpu_bytes"))
            )
            print(f"  {stage}: {seconds:.1f} s", flush=True)
        first_s = time.perf_counter() - t_all
        noop = [dvc(repo, plain, "repro") for _ in range(args.repeats)]
        status = subprocess.run(
            ["dvc", "status"], cwd=repo, env=plain, capture_output=True, text=True
        ).stdout.strip()
    finally:
        if args.keep:
            print(f"temp copy kept: {repo}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{machine()}, load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"params overridden: {', '.join(overrides) or 'none (params.yaml defaults)'}")
    if args.nproc > 1:
        print(f"train stage: torchrun --standalone --nproc_per_node {args.nproc}")
    print()
    print(
        "| stage | `dvc repro -s` wall s | stage process s | DVC overhead s | peak RSS MiB "
        "| peak GPU MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for stage, total, own, rss, gpu in rows:
        own_s = f"{own:.1f}" if own is not None else "-"
        over = f"{total - own:.1f}" if own is not None else "-"
        rss_s = f"{rss / 1024:,.0f}" if rss else "-"
        gpu_s = f"{gpu / 2**20:,.0f}" if gpu else "-"
        print(f"| {stage} | {total:.1f} | {own_s} | {over} | {rss_s} | {gpu_s} |")
    print(f"| all stages | {first_s:.1f} | | | | |")
    print()
    print(
        f"no-change `dvc repro`: best {min(noop):.2f} s of {args.repeats} "
        f"({', '.join(f'{s:.2f}' for s in noop)}; target < 5 s); dvc status: {status!r}"
    )
    print("peak GPU: torch's allocator (onnxruntime's CUDA memory is not counted); '-' = no CUDA")


if __name__ == "__main__":
    main()
