"""Data-parallel training: `torchrun --nproc_per_node 2` on CPU (gloo) = 1 process, same batch.

Two ranks each take half of every global batch (and of its binarization and eps draws); DDP
sums their gradients, so the weights match one process up to float summation order. Tolerance:
atol 1e-5 on every weight after 3 epochs (the largest difference seen is 3e-8).
"""

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, clean_env, set_params, sh, train_cfg, vae_cfg

from vaepipe.device import set_threads
from vaepipe.model import checkpoint
from vaepipe.model.vae import VAE
from vaepipe.training import distributed
from vaepipe.training.loop import fit

TESTS = Path(__file__).resolve().parent
ATOL = 1e-5
CFG = vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[32])
# 393 = 8 * 49 + 1: batches of 49 split 25 / 24 between the ranks, and a last batch of one
# example leaves rank 1 an empty slice.
TRAIN = train_cfg(epochs=3, batch_size=49, threads=1)
N_TRAIN = 393


def tiny_data():
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 1, 8, 8, generator=g)
    x = protos[torch.randint(0, 4, (N_TRAIN + 100,), generator=g)] * 0.9 + 0.05
    return x[:N_TRAIN], x[N_TRAIN:]


def train_tiny(group=distributed.SINGLE, interrupt_at: int = 0, resume=None, options=None):
    """fit on the tiny set; rank 0 keeps every checkpoint. interrupt_at: this rank sends
    itself SIGINT in that encoder call (1-based; training steps and one validation pass an
    epoch), as a signal to one rank only would."""
    cfg = dataclasses.replace(TRAIN, **(options or {}))
    set_threads(cfg.threads)
    x, x_val = tiny_data()
    torch.manual_seed(0)
    vae = VAE(CFG)
    saved: list[dict] = []
    if interrupt_at:
        calls = {"n": 0}

        def hook(module, args):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)

        vae.encoder.register_forward_pre_hook(hook)
    try:
        history = fit(
            vae,
            x,
            x_val,
            cfg,
            "dynamic",
            on_checkpoint=saved.append if group.is_main else None,
            resume=resume,
            progress=False,
            group=group,
        )
    except KeyboardInterrupt:
        return vae, None, saved
    return vae, history, saved


WORKER = """
import json, sys, torch
sys.path[:0] = [{tests!r}, {helpers!r}, {scripts!r}]  # this module and the tests' helpers
from test_distributed import train_tiny
from vaepipe.training import distributed

interrupt_rank, interrupt_at, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
options = json.loads(sys.argv[4])
with distributed.session(torch.device("cpu")) as (group, device):
    at = interrupt_at if group.rank == interrupt_rank else 0
    vae, history, saved = train_tiny(group, interrupt_at=at, options=options)
    if group.is_main:
        torch.save({{
            "weights": vae.state_dict(),
            "val": [h.val for h in history] if history else None,
            "train": [h.train for h in history] if history else None,
            "last_state": saved[-1] if saved else None,
        }}, out)
"""


def torchrun(tmp_path: Path, *args: str, cwd: Path | None = None, check: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, *args],
        cwd=cwd or tmp_path,
        env=clean_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_worker(
    tmp_path: Path, interrupt_rank: int = -1, interrupt_at: int = 0, options=None
) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(tests=str(TESTS), helpers=str(TESTS.parent), scripts=str(ROOT / "scripts"))
    )
    out = tmp_path / "out.pt"
    opts = json.dumps(options or {})
    torchrun(tmp_path, str(script), str(interrupt_rank), str(interrupt_at), str(out), opts)
    return torch.load(out, weights_only=True)


def assert_weights_close(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize(
    "options",
    [{}, {"objective": "iwae", "iwae_k": 3, "lr_schedule": "cosine", "lr_min": 1e-5}],
    ids=["elbo", "iwae-cosine"],
)
def test_two_processes_match_one_process(tmp_path, options):
    # iwae: eps [k, B, D] is split along the batch axis; rank 1's last slice is empty
    two = run_worker(tmp_path, options=options)
    one, history, _ = train_tiny(options=options)
    assert_weights_close(two["weights"], one.state_dict())
    for h2, h1 in zip(two["val"], [h.val for h in history], strict=True):
        assert h2 == pytest.approx(h1, abs=1e-4)
    for h2, h1 in zip(two["train"], [h.train for h in history], strict=True):
        assert h2 == pytest.approx(h1, abs=1e-4)  # epoch means summed over both ranks


def test_a_signal_to_one_rank_stops_both_and_the_checkpoint_resumes_in_one_process(tmp_path):
    calls_per_epoch = -(-N_TRAIN // TRAIN.batch_size) + 1  # steps + one validation batch
    two = run_worker(tmp_path, interrupt_rank=1, interrupt_at=calls_per_epoch + 4)
    state = two["last_state"]
    assert two["val"] is None and state["epoch"] == 1 and state["batch"] == 4
    resumed, _, _ = train_tiny(resume=state)
    one, _, _ = train_tiny()
    assert_weights_close(resumed.state_dict(), one.state_dict())


@pytest.mark.parametrize("launch", ["torchrun by hand", "train.nproc=2"])
def test_pipeline_train_under_torchrun_logs_once_from_rank_0(tmp_path, launch, new_project):
    (tmp_path / "project").mkdir()
    repo = new_project("project", **{"train.threads": 1, "train.resume": False})
    if launch == "torchrun by hand":
        torchrun(tmp_path, "pipeline/train.py", cwd=repo)
    else:  # the stage launches torchrun itself, and DVC tracks what it wrote
        out = sh(repo, "dvc", "exp", "run", "-S", "train.nproc=2", "train").stdout
        assert "launching torchrun: 2 process(es) on each of 1 machine(s)" in out
        assert "up to date" in sh(repo, "dvc", "status", "train").stdout
        set_params(repo, **{"train.nproc": 1})
    two, _ = checkpoint.load(repo / "models" / "vae.pt")
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    db = sqlite3.connect(repo / "mlruns" / "mlflow.db")
    runs = db.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert runs == [(metrics["run_id"], "FINISHED")]  # one run, from rank 0 only
    tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid=?", (runs[0][0],)))
    assert tags["world_size"] == "2"
    epochs = db.execute(
        "SELECT COUNT(*) FROM metrics WHERE run_uuid=? AND key='elbo/val'", (runs[0][0],)
    ).fetchone()[0]
    assert epochs == metrics["epochs"]

    sh(repo, "python", "pipeline/train.py")
    one, _ = checkpoint.load(repo / "models" / "vae.pt")
    assert_weights_close(two.state_dict(), one.state_dict())


def test_a_mistake_found_by_every_process_is_one_line_and_the_stage_exits_2(tmp_path, new_project):
    """The launching stage ends with its processes' status; the same error on every process
    is said once per machine, without torchrun's traceback banner."""
    (tmp_path / "project").mkdir()
    repo = new_project("project", **{"train.nproc": 2, "train.batch_size": 5000})
    proc = sh(repo, "python", "pipeline/train.py", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: param 'train.batch_size' = 5000 is larger than the 1294 training examples"
    ], out
    assert "Traceback" not in out and "ChildFailedError" not in out
