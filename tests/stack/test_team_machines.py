"""Two machines, one project, for real: two clones (two folders) sharing a git remote (a bare
repo on disk), the MLflow server and the DVC remote of one team stack (scripts/team.py); and
two "nodes" training as one through the train stage's own torchrun launch."""

import hashlib
import json
import subprocess
import time
import urllib.request

import numpy as np
import torch
from helpers import clean_env, make_project, sh
from teamstack import (
    exp_run_ids,
    free_port,
    mlflow_client,
    queue_logs,
    queue_workers,
    served,
    start_queue,
    team_project,
    wait_queue,
    wire,
)

EXPERIMENT = "vaepipe"  # params.yaml's mlflow.experiment
# One grid, shared out: each machine queues its own share, with params of its own (a stage
# DVC restores from its run cache runs no code and so would log no MLflow run). A runs its two
# with two workers, B its one: three pipelines logging and registering at once.
GRID = {"a": {"a-seed1": 1, "a-seed2": 2}, "b": {"b-seed3": 3}}
WORKERS = {"a": 2, "b": 1}
QUEUE_TIMEOUT = 900


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_machines_share_one_grid_its_runs_and_its_models(stack, tmp_path):
    origin = tmp_path / "origin.git"
    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))
    machine = {"a": team_project(tmp_path / "a", stack)}
    sh(machine["a"], "git", "remote", "add", "origin", str(origin))
    sh(machine["a"], "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    sh(tmp_path, "git", "clone", "-q", "--branch", "main", str(origin), str(tmp_path / "b"))
    machine["b"] = tmp_path / "b"
    wire(machine["b"], stack)  # the clone has the remote; its credentials are machine-local
    assert sh(machine["b"], "git", "status", "--porcelain").stdout == ""
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"])

    # Both machines run their share of the grid at the same time.
    for m, share in GRID.items():
        for name, seed in share.items():
            sh(machine[m], "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.seed={seed}")
    t0 = time.monotonic()
    with queue_workers(machine["a"]), queue_workers(machine["b"]):
        for m in GRID:
            start_queue(machine[m], env, WORKERS[m])
        states = {m: wait_queue(machine[m], env, QUEUE_TIMEOUT) for m in GRID}
        grid_s = time.monotonic() - t0
        print(
            f"\ngrid of {sum(map(len, GRID.values()))} experiments on 2 machines: {grid_s:.0f} s"
        )
        for m, share in GRID.items():
            failed = [n for n in share if states[m].get(n) != "Success"]
            assert not failed, f"{states}\n{queue_logs(machine[m], failed, env)}"

    # A shares its experiments (git refs to origin, outputs to the DVC remote); B fetches them.
    sh(machine["a"], "dvc", "exp", "push", "origin", *GRID["a"], env=env)
    sh(machine["b"], "dvc", "exp", "pull", "origin", *GRID["a"], env=env)
    run_ids = exp_run_ids(machine["b"], env)
    names = [n for share in GRID.values() for n in share]
    assert set(names) <= set(run_ids), run_ids
    assert len({run_ids[n] for n in names}) == len(names)

    # Every experiment, from either machine: exactly one FINISHED run in the one experiment,
    # the run its train.json names, and one registered version of each model per run.
    client = mlflow_client(stack)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([exp_id], max_results=1000)
    by_name = {}
    for r in runs:
        by_name.setdefault(r.data.tags.get("dvc_exp_name"), []).append(r)
    for name in names:
        got = [(r.info.run_id, r.info.status) for r in by_name.get(name, [])]
        assert got == [(run_ids[name], "FINISHED")], (name, got)
    assert not [r for r in runs if r.info.status != "FINISHED"]
    for model in ("vae-encoder", "vae-decoder"):
        versions = client.search_model_versions(f"name = '{model}'", max_results=1000)
        per_run = [v.run_id for v in versions]
        assert sorted(per_run) == sorted(run_ids[n] for n in names), (model, per_run)
        assert len({v.version for v in versions}) == len(versions)

    # B checks out one of A's experiments and gets its model from the DVC remote: nothing runs.
    b, chosen = machine["b"], "a-seed2"
    sh(b, "dvc", "exp", "apply", chosen, env=env)
    t0 = time.monotonic()
    sh(b, "dvc", "pull", env=env)
    pull_s = time.monotonic() - t0
    assert json.loads((b / "metrics/train.json").read_text())["run_id"] == run_ids[chosen]
    status = sh(b, "dvc", "status", env=env).stdout
    assert "up to date" in status, status
    repro = sh(b, "dvc", "repro", env=env)
    assert "Running stage" not in repro.stdout + repro.stderr, repro.stdout

    # ... and serves that run's registered decoder, which answers as the pulled decoder.onnx.
    version = next(
        v.version
        for v in client.search_model_versions("name = 'vae-decoder'")
        if v.run_id == run_ids[chosen]
    )
    z = np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32)  # latent_dim 4
    t0 = time.monotonic()
    with served(f"models:/vae-decoder/{version}", env) as port:
        serve_s = time.monotonic() - t0
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": z.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            predictions = json.load(resp)["predictions"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(b / "models/decoder.onnx"), providers=["CPUExecutionProvider"])
    local = sess.run(None, {"z": z})[0]
    served_x = np.asarray(predictions["x_mean"] if isinstance(predictions, dict) else predictions)
    np.testing.assert_allclose(served_x, local, atol=1e-6)
    print(
        f"dvc pull of {chosen} on B: {pull_s:.1f} s; "
        f"models:/vae-decoder/{version} served in {serve_s:.1f} s"
    )


def node_project(path, stack, node_rank: int, endpoint: str):
    return make_project(
        path,
        **{
            "train.nnodes": 2,
            "train.node_rank": node_rank,
            "train.rdzv_endpoint": endpoint,
            "train.threads": 1,
            "mlflow.experiment": "two-nodes",
        },
    )


def test_two_nodes_launched_by_the_stage_train_as_one_process_and_log_one_run(stack, tmp_path):
    """`dvc repro train` on two "machines" (two copies, node_rank 0 and 1, c10d rendezvous on
    127.0.0.1): the weights equal one process's to atol 1e-5, and one MLflow run holds them."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [node_project(tmp_path / f"node{r}", stack, r, endpoint) for r in (0, 1)]
    env = clean_env(MLFLOW_TRACKING_URI=stack["uri"])
    t0 = time.monotonic()
    launches = [
        subprocess.Popen(
            ["dvc", "repro", "train"],
            cwd=n,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for n in reversed(nodes)  # node 1 first: torchrun would make it rank 0 (its pid is lower)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in launches]
    finally:
        for p in launches:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    two_nodes_s = time.monotonic() - t0
    for p, out in zip(launches, outputs, strict=True):
        assert p.returncode == 0, out
        assert "launching torchrun: 1 process(es) on each of 2 machine(s)" in out
    for n in nodes:  # each node's DVC tracks what its stage wrote
        assert "up to date" in sh(n, "dvc", "status", "train").stdout

    single = make_project(tmp_path / "single", **{"train.threads": 1})
    sh(single, "dvc", "repro", "train")
    one = torch.load(single / "models/vae.pt", weights_only=True)["state_dict"]
    worst = 0.0
    for n in nodes:
        two = torch.load(n / "models/vae.pt", weights_only=True)["state_dict"]
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
            worst = max(worst, (two[k] - one[k]).abs().max().item())

    run_ids = {json.loads((n / "metrics/train.json").read_text())["run_id"] for n in nodes}
    client = mlflow_client(stack)
    exp = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([exp.experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(*run_ids, "FINISHED")]
    assert runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.params["train.node_rank"] == "0"  # node 0 logged it
    epochs = json.loads((nodes[0] / "metrics/train.json").read_text())["epochs"]
    assert len(client.get_metric_history(runs[0].info.run_id, "elbo/val")) == epochs
    print(f"\n2 nodes x 1 process: {two_nodes_s:.1f} s; max |w2 - w1| = {worst:.1e}")
