"""What the stages assemble, tested in-process: the train stage's per-epoch pictures and the
checkpoint fingerprint, the evaluate stage's report (every figure of a tiny model, its pictures
and summary), and the export stage's variants and parity gate."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import params, proto_data, vae_cfg

from vaepipe import config, imagefiles
from vaepipe.data import arrays
from vaepipe.evaluation import quality, report
from vaepipe.export import graphs, release
from vaepipe.model.vae import VAE
from vaepipe.training import run, session

SCRIPT = Path(__file__)


def _vae(**options) -> VAE:
    torch.manual_seed(0)
    return VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16], **options)).eval()


# --- train: pictures and the fingerprint --------------------------------------------------------


def test_epoch_pictures_come_at_the_first_every_nth_and_last_epoch():
    _, xv = proto_data()
    cfg = dataclasses.replace(params().train, epochs=12, image_every=5)
    pictures = run.EpochPictures(_vae(), xv, cfg)
    assert [e for e in range(1, 13) if pictures.due(e)] == [1, 5, 10, 12]
    off = run.EpochPictures(_vae(), xv, dataclasses.replace(cfg, image_every=0))
    assert not any(off.due(e) for e in range(1, 13))


def test_epoch_pictures_are_uint8_grids_that_leave_the_training_rng_alone():
    _, xv = proto_data()
    pictures = run.EpochPictures(_vae(), xv, params().train)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    grids = pictures.grids()
    assert torch.equal(before, torch.get_rng_state())
    assert set(grids) == {"samples", "reconstructions"}
    # 64 samples in rows of 8 (8x8 images, 2 px apart), drawn 12 times larger (96 px each);
    # 32 inputs above 32 reconstructions, the rows named in a margin
    assert grids["samples"].shape == (12 * (8 * 10 + 2), 12 * (8 * 10 + 2))
    margin = imagefiles.LABEL_WIDTH
    assert grids["reconstructions"].shape == (12 * (8 * 10 + 2), margin + 12 * (8 * 10 + 2))
    assert (grids["reconstructions"][:, :margin] < 128).any()  # "input", "recon." written
    assert all(g.dtype == np.uint8 for g in grids.values())


def test_the_fingerprint_follows_params_and_code_but_not_where_processes_run(tmp_path):
    p = params()
    base = session.fingerprint(p, 100, SCRIPT)
    assert session.fingerprint(p, 100, SCRIPT) == base
    lr = dataclasses.replace(p, train=dataclasses.replace(p.train, lr=0.002))
    assert session.fingerprint(lr, 100, SCRIPT) != base
    assert session.fingerprint(p, 101, SCRIPT) != base  # other data
    other_code = tmp_path / "train.py"
    other_code.write_text("# another stage script\n")
    assert session.fingerprint(p, 100, other_code) != base
    moved = dataclasses.replace(p, train=dataclasses.replace(p.train, nproc=4, resume=False))
    assert session.fingerprint(moved, 100, SCRIPT) == base


# --- evaluate: the report -----------------------------------------------------------------------


@pytest.fixture
def evaluated(tmp_path, monkeypatch):
    """A tiny model's report, measured as the evaluate stage does, in a project folder with
    prepared digits, no classifier and no training curves."""
    monkeypatch.chdir(tmp_path)
    p = params(data={"dataset": "digits"}, evaluate={"iwae_k": 4, "fid_n": 50, "ood_n": 50})
    from vaepipe.data import sources

    for name, split in sources.prepare_splits(p.data).items():
        arrays.save_split(Path("data/prepared") / f"{name}.npz", split)
    vae = _vae()
    test = report.load_test(vae, torch.device("cpu"), p.evaluate.seed)
    measured = report.measure(vae, test, p, "digits", tmp_path / "plots")
    return measured, test, tmp_path / "plots"


def test_the_report_holds_every_figure_its_protocol_and_why_some_are_missing(evaluated):
    measured, test, plots = evaluated
    r = measured.results
    assert r["iwae_k"] == 4 and r["iwae_n"] == r["n_test"] == len(test.x)
    assert r["data_digest"] == arrays.digest(test.split)
    assert r["test/elbo"] == pytest.approx(-(r["test/recon"] + r["test/kl"]), abs=1e-4)
    assert r["test/nll_iwae"] <= -r["test/elbo"] + 1.0
    assert r["mutual_info_max"] == pytest.approx(math.log(len(test.x)))
    assert measured.per_image.shape == (len(test.x),)
    assert measured.per_image.mean() == pytest.approx(r["test/nll_iwae"])
    # no classifier stage ran: sample quality is skipped, with the reason
    assert (
        "test/fid" not in r
        and "is missing (run the classifier stage)" in (measured.skipped["test/fid"])
    )
    assert "plots/training_curves.png" in measured.skipped
    assert {p.name for p in plots.iterdir()} >= {
        "reconstructions.png",
        "samples.png",
        "latent_2d.png",
        "kl_per_dim.json",
    }
    rows = json.loads((plots / "kl_per_dim.json").read_text())
    assert [row["dim"] for row in rows] == [0, 1, 2]


def test_the_summary_reads_one_line_per_question(evaluated):
    measured, _, _ = evaluated
    text = report.summary(measured, 3, 12.3, "RUN")
    lines = text.splitlines()
    assert lines[0].startswith("evaluate: ") and "in 12 s" in lines[0]
    assert any(ln.lstrip().startswith("likelihood      NLL (IWAE, k=4") for ln in lines)
    assert any("sample quality  FID skipped" in ln for ln in lines)
    assert any(ln.lstrip().startswith("skipped") and "test/fid" in ln for ln in lines)
    assert lines[-1].endswith("MLflow run RUN")


def test_sample_quality_of_a_learned_prior_measures_every_sampler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, _ = proto_data(n=700)
    y = torch.arange(len(x)) % 4
    classifier = quality.train_classifier(x, y, epochs=1, batch_size=64, lr=1e-3, seed=0)
    torch.save(
        {"state_dict": classifier.state_dict(), "channels": 1, "n_classes": 4},
        tmp_path / "classifier.pt",
    )
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "classifier.json").write_text('{"test_accuracy": 0.5}')
    monkeypatch.setattr(report.paths, "CLASSIFIER", tmp_path / "classifier.pt")
    vae = _vae(prior="mog", prior_components=3)
    p = params(evaluate={"fid_n": 100})
    inp = report.Inputs(x, x, y.numpy(), arrays.Split(x.numpy(), y.numpy()))
    mu_train = np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32)
    results, skipped = report.sample_quality(vae, inp, p, mu_train)
    assert skipped == {}
    table = results["sample_quality"]
    assert set(table) >= {"standard", "prior", "aggregate"} and table["n"] == 100
    assert results["test/fid"] == table["prior"]["fid"]  # the model's own prior
    assert {"test/fid_standard", "test/fid_prior", "test/fid_aggregate"} <= set(results)
    assert table["classifier_accuracy"] == 0.5


# --- export: variants and the gate --------------------------------------------------------------


def test_variants_record_their_parity_and_the_fp32_gate_refuses_over_tolerance(tmp_path):
    vae = _vae()
    p = params()
    eps = torch.randn(8, vae.noise_dim, generator=torch.Generator().manual_seed(0))
    files = graphs.export_models(vae, tmp_path, 18, {"dataset": "digits"}, eps, 0)
    ex = dataclasses.replace(p.export, scorer_k=8)
    _, results = release.check_parity(vae, files, ex)
    variant_results, warnings = release.export_variants(vae, files, ex)
    assert warnings == []
    for name in ("encoder", "decoder"):
        for precision in ("fp16", "int8"):
            path = tmp_path / f"{name}.{precision}.onnx"
            meta = {m.key: m.value for m in onnx.load(str(path)).metadata_props}
            assert meta["precision"] == precision and meta["parity_ok"] == "True"
            assert variant_results[f"size_bytes/{name}_{precision}"] == path.stat().st_size
    assert release.gate(results, ex) == []
    strict = dataclasses.replace(ex, parity_atol=1e-12)
    with pytest.raises(graphs.ExportError, match="ONNX parity failed: max abs error"):
        release.gate({**results, "parity_max_abs_err": 1e-6}, strict)
    scorer_off = {**results, "parity/scorer_b1": 0.5}
    assert release.gate(scorer_off, ex) == ["scorer.onnx differs from PyTorch by 0.5 nats"]


def test_version_tags_say_what_promotion_compares():
    p = params()
    ev = {
        "test/nll_iwae": 100.123456,
        "test/nll_iwae_stderr": 1.5,
        "iwae_k": 500,
        "iwae_n": 1000,
        "data_digest": "0123456789abcdef",
    }
    facts = {
        "params": config.flatten(p),
        "evaluate": ev,
        "git_commit": "abc",
        "dvc_exp": None,
        "export": {"parity_max_abs_err": 1e-6},
    }

    class Session:
        provider = "CPUExecutionProvider"

    tags = release.version_tags("decoder", facts, Session(), (1, 28, 28))
    assert tags["image_shape"] == "1,28,28" and tags["test_nll_iwae"] == "100.1235"
    assert (tags["nll_iwae_k"], tags["nll_iwae_n"]) == (500, 1000)
    assert tags["test_data_digest"] == "0123456789abcdef" and tags["dvc_exp_name"] == ""
    assert tags["evaluate_seed"] == p.evaluate.seed and tags["precision"] == "fp32"


def test_the_kl_chart_of_a_very_wide_latent_stays_a_readable_size(tmp_path):
    """100,000 dims drew a 25,000-inch chart (13.8 GB); it shows the dims with the most KL."""
    from PIL import Image

    from vaepipe.evaluation import plots

    kl = np.random.default_rng(0).random(100_000)
    shown = np.sort(np.argsort(-kl)[:256])
    plots.kl_per_dim_bars(tmp_path / "kl.png", kl[shown], kl[shown], 0.5, dims=shown, of=len(kl))
    with Image.open(tmp_path / "kl.png") as im:
        assert im.size[0] * im.size[1] < 40 * 6 * 200**2  # at most 40 x 6 inches


def test_bf16_and_compile_warn_where_they_were_measured_slower(capsys):
    t = params().train
    assert session.speed_warnings(t, "cuda") == session.speed_warnings(t, "cpu") == []
    bf16 = dataclasses.replace(t, precision="bf16")
    assert "'train.precision' = 'bf16'" in session.speed_warnings(bf16, "cuda")[0]
    assert session.speed_warnings(bf16, "cpu") == []  # faster with AVX512-BF16
    compiled = dataclasses.replace(t, compile="reduce-overhead")
    assert "'train.compile' = 'reduce-overhead'" in session.speed_warnings(compiled, "cpu")[0]
    assert session.speed_warnings(compiled, "cuda") == []
    p = dataclasses.replace(params(), train=dataclasses.replace(bf16, compile="default"))
    session.check_device_params(p, torch.device("cpu"))
    assert capsys.readouterr().err.startswith("train: warning: param 'train.compile'")
