"""The team stack on one machine: PostgreSQL, an S3 store (SeaweedFS) and an MLflow server.

    python scripts/team.py up|down|status [--dir DIR]      (make team-up / make team-down)
    python scripts/team.py down mlflow|s3|postgres          (one part; `up` starts it again)

Everything listens on 127.0.0.1 only, on free ports picked once and kept in DIR/state.json, and
lives in DIR (default: .team/ in the project): PostgreSQL's cluster (run as the `postgres` user
when we are root: it refuses to run as root), SeaweedFS's `weed mini` with the buckets `mlflow`
(MLflow artifacts) and `dvc` (the DVC remote), and `mlflow server` on PostgreSQL with proxied
artifacts, so MLflow clients hold no object-store credentials. `up` waits until each part
answers, prints MLFLOW_TRACKING_URI and the DVC remote commands, and is a no-op (that reprints)
when the stack already runs; when only some parts run (one crashed, or was stopped with `down
PART`), it starts the others on the same ports. A part that fails stops what this `up` started.
`down` stops exactly the processes `up` started, by pid and process group, and waits for them.

Credentials: VAEPIPE_TEAM_S3_KEY, VAEPIPE_TEAM_S3_SECRET, VAEPIPE_TEAM_PG_PASSWORD, or, for each
one not set, a value generated once into DIR/credentials.env (mode 0600). They reach the servers
through their environments only (never a command line, URI, log or git), and state.json keeps a
salted hash of each so an `up` with other values than the running stack's is refused.
Beyond one machine: run `mlflow server --host 0.0.0.0 --allowed-hosts 'mlflow-host:PORT,
mlflow-host'` (since MLflow 3.5 other Host headers are refused) and put PostgreSQL and the S3
store on addresses the team can reach. Standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import team_servers as servers
from team_procs import TeamError, ours, stop, wait_until

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = ("VAEPIPE_TEAM_S3_KEY", "VAEPIPE_TEAM_S3_SECRET", "VAEPIPE_TEAM_PG_PASSWORD")
S3_KEY, S3_SECRET, PG_PASSWORD = CREDENTIALS
DVC_URL = "s3://dvc/vaepipe"
TIMEOUTS = {"s3": 60, "mlflow": 180, "stop": 30}


# --- state, credentials, ports -------------------------------------------------------------


def load_state(d: Path) -> dict:
    path = d / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(d: Path, state: dict) -> None:
    tmp = d / "state.json.tmp"
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(d / "state.json")


def credentials(d: Path) -> dict[str, str]:
    """Each credential from its environment variable, else from (or generated into) the file."""
    path = d / "credentials.env"
    stored = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            stored[name] = value
    missing = [n for n in CREDENTIALS if not os.environ.get(n) and n not in stored]
    if missing:
        # hex: no leading "-" that a command line would take for an option, nothing to quote
        new = {
            S3_KEY: "VP" + secrets.token_hex(9).upper(),
            S3_SECRET: secrets.token_hex(20),
            PG_PASSWORD: secrets.token_hex(16),
        }
        stored.update({n: new[n] for n in missing})
        tmp = d / "credentials.env.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{n}={v}\n" for n, v in stored.items()))
        tmp.replace(path)
    return {n: os.environ.get(n) or stored[n] for n in CREDENTIALS}


def secret_ref(d: Path, name: str) -> str:
    """A shell expression that yields the credential without printing it."""
    if os.environ.get(name):
        return f'"${name}"'
    return f"\"$(sed -n 's/^{name}=//p' {shlex.quote(str(d / 'credentials.env'))})\""


def fingerprint(salt: str, value: str) -> str:
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is ok
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(previous: dict) -> dict:
    """Free loopback ports, the previous ones where still free (URLs stay the same)."""
    weed = servers.WEED_PORTS
    names = ["postgres", "mlflow", *weed, *(f"{n}_grpc" for n in weed)]
    ports, held = {}, []
    for name in names:
        if previous.get(name) and port_free(previous[name]):
            ports[name] = previous[name]
            continue
        s = socket.socket()  # held open until all are picked, so no two picks collide
        s.bind(("127.0.0.1", 0))
        held.append(s)
        ports[name] = s.getsockname()[1]
    for s in held:
        s.close()
    admin = previous.get("admin")
    while not (admin and port_free(admin) and port_free(admin + 10000)):
        admin = 20000 + secrets.randbelow(35000)
        admin = admin if admin not in ports.values() else None
    ports["admin"] = admin
    return ports


# --- commands -------------------------------------------------------------------------------

STOP_ORDER = ("mlflow", "s3", "postgres")
STOP_SIGNAL = {"mlflow": signal.SIGTERM, "s3": signal.SIGTERM, "postgres": signal.SIGINT}


def running(state: dict) -> dict[str, bool]:
    return {name: ours(e) for name, e in state.get("procs", {}).items()}


def usage(d: Path, state: dict) -> str:
    p = state["ports"]
    return "\n".join([
        f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{p['mlflow']}",
        f"dvc remote add -d -f team {DVC_URL}",
        f"dvc remote modify team endpointurl http://127.0.0.1:{p['s3']}",
        f"dvc remote modify --local team access_key_id {secret_ref(d, S3_KEY)}",
        f"dvc remote modify --local team secret_access_key {secret_ref(d, S3_SECRET)}",
        f"export VAEPIPE_TUNE_STORAGE=postgresql+psycopg2://{servers.PG_USER}:"
        f"{secret_ref(d, PG_PASSWORD)}@127.0.0.1:{p['postgres']}/{servers.STUDY_DB}",
    ])  # fmt: skip


def check_same_credentials(d: Path, state: dict, creds: dict) -> None:
    for name in CREDENTIALS:
        if fingerprint(state["salt"], creds[name]) != state["fingerprints"][name]:
            source = "the environment" if os.environ.get(name) else d / "credentials.env"
            raise TeamError(
                f"{name} (from {source}) is not the value the running stack was started "
                "with; set it as it was, or run `make team-down` first"
            )


def up(d: Path, workers: int) -> None:
    """Start the stack; when some parts run (one crashed, or was stopped with `down PART`),
    start only the others, on the ports the running ones and the clients already know."""
    state = load_state(d)
    alive = running(state)
    if alive and all(alive.values()) and set(alive) == set(STOP_ORDER):
        check_same_credentials(d, state, credentials(d))
        print(f"team stack already running in {d}")
        print(usage(d, state))
        return
    (d / "logs").mkdir(mode=0o711, exist_ok=True)
    creds = credentials(d)
    if any(alive.values()):
        check_same_credentials(d, state, creds)
        parts = [n for n in START_ORDER if not alive.get(n)]
        taken = [f"{n} {state['ports'][n]}" for n in parts if not port_free(state["ports"][n])]
        if taken:
            raise TeamError(
                f"cannot restart {', '.join(parts)} in {d}: port {', '.join(taken)} is taken "
                "by another process; run `down`, then `up`"
            )
        for name in parts:
            state["procs"].pop(name, None)
    else:
        salt = secrets.token_hex(8)
        state = {
            "ports": pick_ports(state.get("ports", {})),
            "procs": {},
            "salt": salt,
            "fingerprints": {n: fingerprint(salt, v) for n, v in creds.items()},
        }
        parts = list(START_ORDER)
    t0 = time.monotonic()
    times = start_parts(d, state, creds, parts, workers)
    detail = ", ".join(f"{n} {s:.1f} s" for n, s in times.items())
    what = "team stack" if len(parts) == len(START_ORDER) else f"team stack: {', '.join(parts)}"
    print(f"{what} up in {time.monotonic() - t0:.1f} s ({detail}); state in {d}")
    print(usage(d, state))
    print(
        "# other hosts: serve with --host 0.0.0.0 --allowed-hosts 'mlflow-host:PORT,mlflow-host'"
    )


START_ORDER = ("s3", "postgres", "mlflow")


def start_parts(d: Path, state: dict, creds: dict, parts: list[str], workers: int) -> dict:
    """Start `parts` (in START_ORDER), each waited for; {part: seconds}. A part that fails
    stops the parts this call started, and only those."""
    ports, times, t0 = state["ports"], {}, time.monotonic()
    part, weed = "", None
    try:
        if "s3" in parts:  # weed starts in the background while PostgreSQL initialises
            part = "s3"
            weed, state["procs"]["s3"] = servers.start_s3(
                d, ports, creds[S3_KEY], creds[S3_SECRET]
            )
            save_state(d, state)
        if "postgres" in parts:
            part, t = "postgres", time.monotonic()
            state["procs"]["postgres"] = servers.start_postgres(d, ports["postgres"])
            save_state(d, state)
            servers.create_pg_role(d, ports["postgres"], creds[PG_PASSWORD])
            times["postgres"] = time.monotonic() - t
        if "s3" in parts:
            part, log = "s3", d / "logs" / "weed.log"
            wait_until("weed mini", lambda: servers.s3_ready(ports), TIMEOUTS["s3"], weed, log)
            times["s3"] = time.monotonic() - t0
        if "mlflow" in parts:
            part, t, log = "mlflow", time.monotonic(), d / "logs" / "mlflow.log"
            server, state["procs"]["mlflow"] = servers.start_mlflow(
                d, ports, creds[S3_KEY], creds[S3_SECRET], creds[PG_PASSWORD], workers
            )
            save_state(d, state)
            ready = lambda: servers.mlflow_ready(ports)  # noqa: E731
            wait_until("mlflow server", ready, TIMEOUTS["mlflow"], server, log)
            times["mlflow"] = time.monotonic() - t
    except (TeamError, OSError, subprocess.SubprocessError, KeyboardInterrupt) as e:
        stopped = stop_parts(d, state, parts)
        raise TeamError(
            f"team-up failed at {part}: {e}; stopped {', '.join(stopped) or 'nothing'}"
        ) from None
    return times


def stop_parts(d: Path, state: dict, parts=STOP_ORDER) -> list[str]:
    stopped = []
    for name in STOP_ORDER:
        entry = state.get("procs", {}).get(name)
        if entry and name in parts:
            # PostgreSQL: only the postmaster is signalled (SIGINT: fast shutdown); it stops
            # its own children.
            t = time.monotonic()
            stop(entry, STOP_SIGNAL[name], TIMEOUTS["stop"], group=name != "postgres")
            stopped.append(f"{name} (pid {entry['pid']}, {time.monotonic() - t:.1f} s)")
            if name == "s3":
                servers.remove_weed_sockets(state["ports"])
            del state["procs"][name]
            save_state(d, state)
    return stopped


def down(d: Path, parts: list[str]) -> None:
    """Stop the stack, or only `parts` (`up` starts them again on the same ports)."""
    state = load_state(d)
    if not state.get("procs"):
        print(f"team stack in {d}: nothing running")
        return
    t0 = time.monotonic()
    stopped = stop_parts(d, state, parts or STOP_ORDER)
    print(
        f"team stack stopped in {time.monotonic() - t0:.1f} s: {', '.join(stopped) or 'nothing'}"
    )


def status(d: Path) -> int:
    state = load_state(d)
    alive = running(state)
    for name in reversed(STOP_ORDER):
        entry = state.get("procs", {}).get(name)
        port = state.get("ports", {}).get(name)
        how = f"running, pid {entry['pid']}, port {port}" if alive.get(name) else "not running"
        print(f"{name}: {how}")
    return 0 if alive and all(alive.values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status"))
    ap.add_argument("parts", nargs="*", help="down: only these parts (mlflow, s3, postgres)")
    ap.add_argument("--dir", type=Path, default=ROOT / ".team", help="stack folder (.team/)")
    ap.add_argument("--workers", type=int, default=2, help="mlflow server worker processes")
    args = ap.parse_args(argv)
    if args.parts and (args.command != "down" or set(args.parts) - set(STOP_ORDER)):
        ap.error(f"parts are for `down` only, and one of {', '.join(STOP_ORDER)}")
    d = args.dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o711)  # PostgreSQL's user must reach d/pg; nothing here is listable by others
    try:
        with open(d / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if args.command == "up":
                up(d, args.workers)
            elif args.command == "down":
                down(d, args.parts)
            else:
                return status(d)
    except TeamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
