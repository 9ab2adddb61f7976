"""benchmarks/probe.py through its command line: one JSON line for a short fit on the prepare
stage's files, and one line (exit 2) for a bad override or missing data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


def _probe(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "probe.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def prepared(tiny_pipeline) -> Path:
    """The prepare stage's splits of scikit-learn's digits (8x8), from the shared run."""
    repo, _ = tiny_pipeline
    return repo / "data" / "prepared"


def test_probe_prints_one_json_line_for_a_short_fit(prepared):
    sets = ["model.prior=vamp", "model.prior_components=8", "model.hidden=[32]"]
    proc = _probe(
        "--epochs",
        "2",
        "--k",
        "5",
        "--n",
        "50",
        "--data",
        str(prepared),
        "--name",
        "tiny",
        "-S",
        sets[0],
        "-S",
        sets[1],
        "-S",
        sets[2],
        "-S",
        "train.device=cpu",
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["name"] == "tiny" and row["sets"] == [*sets, "train.device=cpu"]
    assert row["epochs"] == 2 and row["device"] == "cpu" and row["best_epoch"] in (1, 2)
    # 64 binary pixels: the NLL of a trained model is positive and well below 64 log 2 = 44.4
    assert 0 < row["nll_k5_n50"] < 64 * 0.6932
    assert row["val_elbo"] < 0 and row["epoch_seconds"] > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["-S", "nosuch.x=1"], "nosuch"),
        (["-S", "model.activation=gelu"], "model.activation"),
        (["-S", "model.conditional=true"], "conditional"),
        (["--data", "/nonexistent/prepared"], "prepared data"),
    ],
)
def test_probe_refuses_bad_input_in_one_line(prepared, args, words):
    proc = _probe("--epochs", "1", "--data", str(prepared), *args)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
