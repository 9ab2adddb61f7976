"""The team stack for real (scripts/team.py): PostgreSQL, SeaweedFS's S3 and an MLflow server
on loopback, the tiny pipeline logging through it, and a DVC remote on the S3 store."""

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from helpers import ROOT, clean_env, make_project, sh
from teamstack import (
    kill_recorded,
    procs,
    run_team,
    team,
    team_env,
    usage_lines,
)

# What DVC caches (dvc.yaml outs with cache), with models/*.onnx: back byte-identical.
DVC_OUTS = ("data/prepared", "models/vae.pt")


def test_credentials_file_is_private(stack):
    assert (stack["dir"] / "credentials.env").stat().st_mode & 0o777 == 0o600
    assert set(stack["creds"]) == set(team.CREDENTIALS)


def test_up_twice_reprints_and_starts_nothing(stack):
    t0 = time.monotonic()
    again = run_team(stack["dir"], "up")
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - t0 < 10
    assert "already running" in again.stdout
    assert usage_lines(again.stdout) == usage_lines(stack["up"])
    assert team.load_state(stack["dir"])["procs"] == stack["state"]["procs"]


def test_up_with_other_credentials_is_one_line_without_secrets(stack):
    wrong = "wrong-" + os.urandom(8).hex()
    r = run_team(stack["dir"], "up", env=team_env(VAEPIPE_TEAM_S3_SECRET=wrong))
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "VAEPIPE_TEAM_S3_SECRET" in r.stderr
    for secret in (wrong, *stack["creds"].values()):
        assert secret not in r.stderr


def test_half_failed_up_stops_what_it_started(tools):
    d = Path(tempfile.mkdtemp(prefix="vaepipe-team-fail-"))
    d.chmod(0o755)
    try:
        weed = d / "weed"  # fails the way a real one does: a message, then an exit status
        weed.write_text("#!/bin/sh\necho 'fake weed: cannot start' >&2\nsleep 1\nexit 3\n")
        weed.chmod(0o755)
        r = run_team(d, "up", env=team_env(VAEPIPE_TEAM_WEED=str(weed)))
        assert r.returncode == 2
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert "team-up failed at s3: weed mini exited with status 3" in line, line
        assert "fake weed: cannot start" in line and "stopped s3" in line and "postgres" in line
        assert team.load_state(d)["procs"] == {}
        assert not [p for p in stack_pids_by_path(d)], "a process of the failed stack lives on"
    finally:
        run_team(d, "down")
        kill_recorded(d)
        shutil.rmtree(d, ignore_errors=True)


def stack_pids_by_path(d: Path) -> list[int]:
    """Live processes whose command line names the stack folder."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and procs.proc_stat(int(p.name)) is not None:
            try:
                if str(d).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def digests(repo: Path) -> dict[str, str]:
    files = [*sorted((repo / "data/prepared").rglob("*")), repo / "models/vae.pt"]
    files += sorted((repo / "models").glob("*.onnx"))
    return {str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def s3_client(stack, secret=None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{stack['state']['ports']['s3']}",
        aws_access_key_id=stack["creds"]["VAEPIPE_TEAM_S3_KEY"],
        aws_secret_access_key=secret or stack["creds"]["VAEPIPE_TEAM_S3_SECRET"],
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )


def test_pipeline_logs_through_the_stack_and_dvc_remote_round_trips(stack, tmp_path):
    repo = make_project(tmp_path / "repo")
    shutil.copy(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")  # as `dvc init` does
    sh(repo, "git", "add", ".dvc/.gitignore")
    sh(repo, "git", "commit", "-qm", "dvc ignores")
    lines = usage_lines(stack["up"])
    uri = lines[0].split("=", 1)[1]
    # The exact commands `up` printed, run by a shell in the repo.
    sh(repo, "bash", "-ec", "\n".join(ln for ln in lines if ln.startswith("dvc ")))
    assert sh(repo, "git", "check-ignore", ".dvc/config.local").returncode == 0

    env = clean_env(MLFLOW_TRACKING_URI=uri)
    sh(repo, "dvc", "repro", env=env)
    run_id = json.loads((repo / "metrics/train.json").read_text())["run_id"]

    # The run is in PostgreSQL, as MLflow's server wrote it.
    import psycopg2

    ports = stack["state"]["ports"]
    conn = psycopg2.connect(
        host="127.0.0.1", port=ports["postgres"], dbname="mlflow", user="mlflow",
        password=stack["creds"]["VAEPIPE_TEAM_PG_PASSWORD"], connect_timeout=10,
    )  # fmt: skip
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s", (run_id,))
        status, artifact_uri = cur.fetchone()
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,))
        n_metrics = cur.fetchone()[0]
    assert status == "FINISHED" and n_metrics > 0
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri  # proxied

    # Its artifacts are objects in the S3 bucket, read with the store's own credentials.
    s3 = s3_client(stack)
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for o in page.get("Contents", [])
    ]
    run_keys = [k for k in keys if f"/{run_id}/artifacts/" in k]
    assert any(k.endswith(".png") for k in run_keys), keys[:20]
    assert any("/models/m-" in k and k.endswith(".onnx") for k in keys), keys[:20]

    before = digests(repo)
    t0 = time.monotonic()
    sh(repo, "dvc", "push", env=env)
    push_s = time.monotonic() - t0
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in DVC_OUTS:
        shutil.rmtree(repo / out) if (repo / out).is_dir() else (repo / out).unlink()
    for f in (repo / "models").glob("*.onnx"):
        f.unlink()
    t0 = time.monotonic()
    sh(repo, "dvc", "pull", env=env)
    pull_s = time.monotonic() - t0
    assert digests(repo) == before
    n_files = len(before)
    print(f"\ndvc push {push_s:.1f} s, dvc pull {pull_s:.1f} s ({n_files} files)")

    # Wrong S3 credentials on the client: refused, and no secret in what DVC prints.
    wrong = "wrong-" + os.urandom(8).hex()
    sh(repo, "dvc", "remote", "modify", "--local", "team", "secret_access_key", wrong)
    r = sh(repo, "dvc", "status", "--cloud", env=env, check=False)
    assert r.returncode != 0
    for secret in (wrong, *stack["creds"].values()):
        assert secret not in r.stdout + r.stderr
    print("dvc with a wrong secret:", [ln for ln in r.stderr.splitlines() if "ERROR" in ln])

    assert_no_credentials(stack, repo, run_id, keys, uri)


def assert_no_credentials(stack, repo: Path, run_id: str, keys: list[str], uri: str) -> None:
    """No credential in the repo (but its git-ignored config.local), git history, params,
    MLflow params/tags/artifacts, the stack's logs or its processes' command lines."""
    import mlflow

    values = [v.encode() for v in stack["creds"].values()]

    def clean(blob: bytes, where: str) -> None:
        for v in values:
            assert v not in blob, f"a credential appears in {where}"

    for f in repo.rglob("*"):
        if f.is_file() and f != repo / ".dvc" / "config.local":
            clean(f.read_bytes(), str(f))
    clean(sh(repo, "git", "log", "-p", "--all").stdout.encode(), "git history")
    for f in (stack["dir"] / "logs").iterdir():
        clean(f.read_bytes(), str(f))
    s3 = s3_client(stack)
    for key in keys:
        clean(s3.get_object(Bucket="mlflow", Key=key)["Body"].read(), f"s3://mlflow/{key}")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    clean(json.dumps([run.data.params, run.data.tags]).encode(), "MLflow params/tags")
    for entry in team.load_state(stack["dir"])["procs"].values():
        for pid in procs.members(entry):
            try:
                clean(Path(f"/proc/{pid}/cmdline").read_bytes(), f"command line of {pid}")
            except OSError:
                pass


def test_down_stops_every_process_of_the_stack(stack):
    state = team.load_state(stack["dir"])
    pids = {p: t for e in state["procs"].values() for p, t in procs.members(e).items()}
    assert len(pids) >= 5  # postmaster + its children, weed, mlflow server + uvicorn workers
    r = run_team(stack["dir"], "down", timeout=120)
    assert r.returncode == 0, r.stderr
    print(f"\n{r.stdout}")
    alive = [p for p, t in pids.items() if procs.ours({"pid": p, "start": t})]
    assert alive == []
    assert stack_pids_by_path(stack["dir"]) == []
    for name in ("postgres", "s3", "mlflow"):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", state["ports"][name])) != 0, name
    ports = {str(p) for p in (*state["ports"].values(), state["ports"]["admin"] + 10000)}
    sockets = [s for s in Path("/tmp").glob("seaweedfs-*.sock") if s.stem.split("-")[-1] in ports]
    assert sockets == []  # weed's gRPC sockets, which it keeps in /tmp
    assert "nothing running" in run_team(stack["dir"], "down").stdout
