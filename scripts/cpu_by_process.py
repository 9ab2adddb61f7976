"""Where a command's CPU goes, by kind of process: runs the command and samples /proc twice a
second, crediting each process's CPU seconds to its kind (a pipeline stage, a dvc subcommand,
a vaepipe command, the MLflow server, a pytest worker, ...). Processes the command leaves
behind (servers, DVC queue workers) are counted too, which `time` misses. A process started by
multiprocessing's spawn (uvicorn's workers) counts as its parent's kind.

    python scripts/cpu_by_process.py -- make test
    python scripts/cpu_by_process.py --by-dir /tmp/pt -- pytest -n 4 --basetemp /tmp/pt

--by-dir ROOT credits a process working under ROOT to the folder it works in there instead
(a test's temp project: pytest-xdist's popen-gwN level is skipped), so the CPU of each test's
stages, servers and commands adds up under one name.

A process that lives less than half a second between two samples is missed; the last line
sets the sampled total beside the CPU seconds /proc/stat counted on the whole machine.
Standard library only; Linux.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

STAGES = ("prepare", "classifier", "train", "evaluate", "export")
# (a word of the command line, its kind), first match wins
KINDS = (
    ("exec(eval(sys.stdin", "pytest worker"),
    ("uvicorn", "mlflow server"),
    ("mlflow.server", "mlflow server"),
    ("huey", "mlflow server"),
    ("celery", "dvc queue worker"),
    ("postgres", "postgres"),
    ("weed", "s3 store (seaweedfs)"),
    ("chrom", "chromium"),
    ("torchrun", "torchrun"),
)


def kind(argv: list[str]) -> str:
    line = " ".join(argv)
    for stage in STAGES:
        if f"pipeline/{stage}.py" in line:
            return f"stage {stage}"
    if "mlflow" in line and " serve" in line:
        return "mlflow models serve"
    for word, name in KINDS:
        if word in line:
            return name
    names = [Path(a).name for a in argv[:3]]
    for tool in ("dvc", "vaepipe", "mlflow", "git", "pytest", "node", "npm", "pip"):
        if tool in names:
            rest = [a for a in argv[names.index(tool) + 1 :] if not a.startswith("-")]
            two = rest[:2] if rest[:1] in (["exp"], ["queue"]) else rest[:1]
            return " ".join([tool, *two])
    if names and names[0].startswith("python"):  # the script or module it runs
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[1:]
        if rest[:1] == ["-c"]:
            return f"{names[0]} -c"
        if rest:
            return f"{names[0]} {' '.join(rest[:2]) if rest[0] == '-m' else Path(rest[0]).name}"
    return names[0] if names else "?"


def machine_cpu() -> float:
    """CPU seconds of the whole machine so far (user, nice, system) from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(f) for f in fields[:3]) / os.sysconf("SC_CLK_TCK")


def folder(pid: str, root: Path | None) -> str | None:
    """The first folder below root (past pytest-xdist's popen-gwN) process pid works in."""
    if root is None:
        return None
    try:
        parts = Path(os.readlink(f"/proc/{pid}/cwd")).relative_to(root).parts
    except (OSError, ValueError):
        return None
    parts = parts[1:] if parts[:1] and parts[0].startswith("popen-gw") else parts
    return f"in {parts[0]}" if parts else None


def cmdline(pid: str) -> list[str]:
    argv = Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace")
    return [a for a in argv.split("\0") if a]


def sample(seen: dict, totals: dict, hz: int, root: Path | None = None) -> None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(stat[11]) + int(stat[12])) / hz
            key = (entry.name, stat[19])  # pid and start time: a reused pid is another process
            if key not in seen:
                name = folder(entry.name, root) or kind(cmdline(entry.name))
                if name.endswith(" -c") and "spawn_main" in " ".join(cmdline(entry.name)):
                    name = kind(cmdline(stat[1]))  # a multiprocessing child: its parent's kind
                seen[key] = [name, 0.0]
        except (OSError, IndexError, ValueError):
            continue  # it ended between the listing and the read
        name, last = seen[key]
        totals[name] = totals.get(name, 0.0) + max(cpu - last, 0.0)
        seen[key][1] = max(cpu, last)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--by-dir", type=Path, help="credit processes working under it by folder")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    hz, seen, totals = os.sysconf("SC_CLK_TCK"), {}, {}
    sample(seen, {}, hz)  # what runs already is not the command's
    before, started = machine_cpu(), time.monotonic()
    proc = subprocess.Popen(command)
    try:
        while proc.poll() is None:
            sample(seen, totals, hz, args.by_dir)
            time.sleep(args.every)
    except KeyboardInterrupt:
        proc.wait()
    sample(seen, totals, hz, args.by_dir)
    wall, machine = time.monotonic() - started, machine_cpu() - before
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        if seconds >= 1:
            print(f"{seconds:8.0f} s  {name}")
    print(
        f"{sum(totals.values()):8.0f} s  sampled, of {machine:.0f} s the machine spent in "
        f"{wall:.0f} s of wall time on {os.cpu_count()} cores; exit {proc.returncode}"
    )
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
