"""`vaepipe literature`: the published table's configurations are valid params, and the page
sets a real MLflow store's runs beside it, counting only finished runs on the protocol."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, clean_env, params_dict

from vaepipe import config
from vaepipe.tracking import literature

PROTOCOL = "IWAE k=5000, 10000 of 10000 test images, seed 0, test data 5270760dc8ab25bd"


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = value
    return out


@pytest.mark.parametrize("cell", literature.CELLS, ids=lambda c: c.name)
def test_every_configuration_is_valid_params_on_the_protocol(cell):
    params = config.from_dict(params_dict(_nested(cell.params)))
    assert params.evaluate.iwae_k == 5000 and params.evaluate.iwae_n == 0
    assert round(60000 * params.data.val_fraction) == 10000
    argv = literature.command(cell, queue=True)
    assert argv[:6] == ["dvc", "exp", "run", "--queue", "-n", cell.name]
    assert f"model.hidden={literature.param_text(cell.params['model.hidden'])}" in argv


def test_param_text_is_what_dvc_reads_back():
    assert literature.param_text([300, 300]) == "[300,300]"
    assert literature.param_text(True) == "true"
    assert literature.param_text(0.0005) == "0.0005"


@pytest.fixture
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("vaepipe", artifact_location=(tmp_path / "a").as_uri())
    vamp = {k: literature.param_text(v) for k, v in literature.cell("vae-vamp").params.items()}
    hvae = {
        k: literature.param_text(v) for k, v in literature.cell("hvae-standard").params.items()
    }
    runs = [  # name, params, protocol, nll, status, device, train seconds
        ("cell", vamp, PROTOCOL, 227.10, "FINISHED", "cpu", 90000),
        ("cell-k500", vamp, PROTOCOL.replace("k=5000", "k=500"), 226.0, "FINISHED", "cpu", 9e4),
        ("cell-failed", vamp, PROTOCOL, 225.0, "FAILED", "cpu", 90000),
        ("hvae-training", hvae, None, None, "RUNNING", "cpu", None),
        ("hvae-shorter", hvae, None, None, "KILLED", "cpu", None),
        ("cpu-30min", {"model.hidden": "[640, 320]"}, PROTOCOL, 227.80, "FINISHED", "cpu", 1700),
        ("cpu-slow", {"model.hidden": "[640, 320]"}, PROTOCOL, 227.0, "FINISHED", "cpu", 1900),
        # resumed with a train_seconds of its last part only: its 80 epochs of 30 s count
        ("cpu-resumed", {"model.hidden": "[640, 320]"}, PROTOCOL, 226.9, "FINISHED", "cpu", 600),
        ("gpu-hour", {"model.arch": "convhvae"}, PROTOCOL, 224.5, "FINISHED", "cuda:0", 3000),
    ]
    for name, params, protocol, nll, status, device, seconds in runs:
        run_id = client.create_run(exp, run_name=name).info.run_id
        for k, v in params.items():
            client.log_param(run_id, k, v)
        if protocol:
            client.set_tag(run_id, "test.nll_protocol", protocol)
        client.set_tag(run_id, "device", device)
        if device.startswith("cuda"):
            client.set_tag(run_id, "device_name", "NVIDIA H200")
        epochs, per_epoch = 80, 30 if name == "cpu-resumed" else 10
        if nll is None:  # training or stopped: per-epoch figures only
            epochs, per_epoch = (120, 9) if name == "hvae-training" else (50, 9)
            client.log_metric(run_id, "best_epoch", epochs - 3, step=epochs)
        else:
            metrics = {"test/nll_iwae": nll, "test/nll_iwae_stderr": 0.31, "epochs_run": 80}
            metrics.update(train_seconds=seconds, best_epoch=79, evaluate_seconds=1930)
            for k, v in metrics.items():
                client.log_metric(run_id, k, v)
        for epoch in range(1, epochs + 1):
            client.log_metric(run_id, "epoch_seconds", per_epoch, step=epoch)
        if name == "cell":  # a description written in mlflow ui, on two lines
            client.set_tag(run_id, "mlflow.note.content", "Trained on a shared\nmachine.")
        if name == "gpu-hour":  # a long one is cut
            client.set_tag(run_id, "mlflow.note.content", "long " * 1000)
        if name == "cell-failed":  # not on the page: its note is not either
            client.set_tag(run_id, "mlflow.note.content", "Diverged.")
        if status != "RUNNING":
            client.set_terminated(run_id, status)
    return uri


def vaepipe(uri, cwd, *args):
    exe = str(Path(sys.executable).parent / "vaepipe")
    return subprocess.run(
        [exe, "literature", *args],
        cwd=cwd,
        env=clean_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _row(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_the_page_counts_finished_protocol_runs_of_each_cell_and_budget(store, tmp_path):
    uri = store
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = vaepipe(uri, tmp_path, "page", "--out", "docs/literature.md")
    assert proc.returncode == 0, proc.stderr
    assert "9 runs, 6 on the protocol -> docs/literature.md" in proc.stdout
    text = (tmp_path / "docs/literature.md").read_text()
    vamp = _row(text, "| VAE, one stochastic layer (MLP) | VampPrior |")
    # the k=500 run (lower) and the failed one (lower still) do not count
    assert "| 227.35 ± 0.05 | 227.10 ± 0.31 | -0.25 | `vae-vamp` |" in vamp
    assert "| 80 (79) | 1500.0 min | 32.2 min | cpu |" in vamp
    assert "not run" in _row(text, "| ConvHVAE | Gaussian |")
    # a cell with runs but none finished on the protocol: the one that went furthest
    hvae = _row(text, "| HVAE, two stochastic layers | Gaussian |")
    assert "| 227.37 ± 0.10 | not finished (MLflow: RUNNING) | | `hvae-standard` |" in hvae
    assert "| 120 (117) | 18.0 min | | cpu |" in hvae
    cpu = _row(text, "| 30 minutes of training on a CPU |")
    assert "227.80 ± 0.31" in cpu and "`model.hidden=[640, 320]`" in cpu
    # not the 1,900 s run, nor the resumed one whose train_seconds (600) is below its epochs'
    assert "226.90" not in text
    # the description of a run on the page, on one line; none of a run not shown
    (cell_id,) = [line.split("`")[1] for line in text.splitlines() if "(cell)" in line]
    assert f"- `{cell_id}` (cell): Trained on a shared machine." in text
    assert cell_id in vamp and "Diverged" not in text
    (long,) = [line for line in text.splitlines() if "(gpu-hour)" in line]
    assert long.endswith("long…") and len(long) < 700
    gpu = _row(text, "| 1 hour of training on one GPU |")
    assert "224.50 ± 0.31" in gpu and "`model.arch=convhvae`" in gpu and "| NVIDIA H200 |" in gpu
    assert not list((tmp_path / "docs").glob("*.tmp"))


def test_bad_inputs_are_one_line(store, tmp_path):
    uri = store
    (tmp_path / "a-file").write_text("kept")
    for args, message in [
        (("page", "--out", str(tmp_path)), "it is a folder"),
        (("page", "--out", "/dev/null"), "cannot write /dev/null: it is not a regular file"),
        (
            ("page", "--out", str(tmp_path / "a-file" / "p.md")),
            "a-file/p.md: " + str(tmp_path / "a-file") + " is not a folder",
        ),
        (("run", "vae-flow"), "no configuration 'vae-flow'; choose one of: protocol, vae-"),
        (("page", "--experiment", "nope"), "no experiment 'nope'"),
        (("run", "protocol"), "dvc exp run exited with"),  # not a DVC project
    ]:
        proc = vaepipe(uri, tmp_path, *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "docs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mlflow.db"]  # no temp file
    assert (tmp_path / "a-file").read_text() == "kept" and Path("/dev/null").is_char_device()
