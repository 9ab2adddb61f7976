"""Processes of the team stack: start them in their own session, know them again by pid and
start time (a pid can be reused), wait for them with bounds, stop them with their children."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


class TeamError(Exception):
    """One line for the user: which part failed and why (never a credential)."""


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name: [state, ppid, pgrp, ...]; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return None if fields[0] in "ZX" else fields


def identity(pid: int) -> dict:
    fields = proc_stat(pid)
    if fields is None:
        raise TeamError(f"process {pid} exited right after starting")
    return {"pid": pid, "pgid": int(fields[2]), "start": fields[19]}


def started(proc: subprocess.Popen, what: str, log: Path) -> dict:
    try:
        return identity(proc.pid)
    except TeamError:
        raise TeamError(f"{what} exited with status {proc.wait(5)}{last_line(log)}") from None


def ours(entry: dict) -> bool:
    """Is the recorded process still the one we started (not a reused pid)?"""
    fields = proc_stat(entry["pid"])
    return fields is not None and fields[19] == entry["start"]


def processes() -> dict[int, list[str]]:
    procs = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (fields := proc_stat(int(p.name))) is not None:
            procs[int(p.name)] = fields
    return procs


def members(entry: dict) -> dict[int, str]:
    """{pid: start time} of our process, its descendants (PostgreSQL's children leave its group)
    and its process group (children of mlflow server that outlived their parent)."""
    procs = processes()
    if not ours(entry):  # only orphans can be left, and only in the group we made
        leader = procs.get(entry["pgid"])
        if leader is not None or entry["pgid"] == os.getpgrp():
            return {}  # the group is gone and its number reused (or it is ours): not to touch
        return {p: f[19] for p, f in procs.items() if int(f[2]) == entry["pgid"]}
    found = {entry["pid"]}
    for _ in range(8):  # a few levels of children
        found |= {p for p, f in procs.items() if int(f[1]) in found}
    found |= {p for p, f in procs.items() if int(f[2]) == entry["pgid"] != os.getpgrp()}
    return {p: procs[p][19] for p in found}


def stop(entry: dict, sig: int, timeout: float, group: bool) -> None:
    """Signal our process (its whole group with `group`), wait until it and every process found
    with it have exited, then SIGKILL whatever is left."""
    targets = members(entry)
    alive = lambda: [p for p, t in targets.items() if ours({"pid": p, "start": t})]  # noqa: E731
    if ours(entry):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(entry["pgid"], sig) if group else os.kill(entry["pid"], sig)
    for attempt in (timeout, 5):
        deadline = time.monotonic() + attempt
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def wait_until(what: str, check, timeout: float, proc: subprocess.Popen | None, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TeamError(f"{what} exited with status {proc.returncode}{last_line(log)}")
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.2)
    raise TeamError(f"{what} did not answer within {timeout:.0f} s{last_line(log)}")


def last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return f" (log {log}: {lines[-1][:200]})" if lines else f" (log {log})"


def open_log(path: Path):
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def http_ok(url: str, accept=(200,)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status in accept
    except urllib.error.HTTPError as e:
        return e.code in accept


def find(tool: str, env_var: str, hint: str) -> str:
    if os.environ.get(env_var):
        return os.environ[env_var]
    if tool in ("initdb", "pg_ctl", "psql"):
        found = shutil.which(tool) or next(
            iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None
        )
    else:
        found = shutil.which(tool, path=str(BIN)) or shutil.which(tool)
    if not found:
        raise TeamError(f"{tool} not found ({hint})")
    return found
