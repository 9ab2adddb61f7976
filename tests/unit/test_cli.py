"""The `vaepipe` command: round trips through ONNX files, no torch at start-up, clean errors."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import vae_cfg
from PIL import Image

from vaepipe import cli
from vaepipe.export import graphs, variants
from vaepipe.inference import runtime
from vaepipe.model.vae import VAE

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """encoder.onnx, decoder.onnx and decoder.int8.onnx of a tiny VAE, exported once."""
    torch.manual_seed(0)
    vae = VAE(vae_cfg(image_shape=(1, 8, 8), latent_dim=3, hidden=[16])).eval()
    out = tmp_path_factory.mktemp("models")
    paths = graphs.export_models(vae, out, opset=18, metadata={"dataset": "digits"})
    variants.to_int8(paths["decoder"], out / "decoder.int8.onnx")
    return paths


def run(*argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and holds none of them."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def decode(models, z):
    return runtime.open_session(models["decoder"], "cpu").run({"z": z})[0]


def test_generate_png_and_npz(models, tmp_path, capsys):
    dec = models["decoder"]
    assert (
        run("generate", "--model", dec, "--n", 10, "--seed", 3, "--out", tmp_path / "g.png") == 0
    )
    out = capsys.readouterr().out
    assert "on CPUExecutionProvider" in out and "10 samples (seed 3)" in out
    assert "libcuda" not in out and "no GPU" not in out  # why: only with --verbose
    with Image.open(tmp_path / "g.png") as im:  # 8x8 images drawn 12 times larger: 96 px
        assert im.mode == "L" and im.size == (12 * (4 * 10 + 2), 12 * (3 * 10 + 2))
        big = np.asarray(im)
    args = ("--n", 10, "--seed", 3, "--scale", 1, "--verbose", "--out", tmp_path / "g1.png")
    assert run("generate", "--model", dec, *args) == 0
    assert "on CPUExecutionProvider (" in capsys.readouterr().out  # and why, when asked
    with Image.open(tmp_path / "g1.png") as im:
        assert im.size == (4 * 10 + 2, 3 * 10 + 2)  # 4 cols, 3 rows, pad 2
        pixels = np.asarray(im)
    np.testing.assert_array_equal(big[::12, ::12], pixels)  # each pixel a 12x12 square
    run("generate", "--model", dec, "--n", 10, "--seed", 3, "--out", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as f:
        z, x = f["z"], f["x_mean"]
    assert z.shape == (10, 3) and x.shape == (10, 1, 8, 8)
    np.testing.assert_allclose(x, decode(models, z), atol=1e-6)
    tile = pixels[2:10, 2:10]  # the first image in the grid, as 8-bit grey
    np.testing.assert_allclose(tile / 255.0, x[0, 0], atol=1 / 255)


def test_generate_is_seeded(models, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run(
            "generate",
            "--model",
            models["decoder"],
            "--seed",
            seed,
            "--out",
            tmp_path / f"{name}.npz",
        )
    a, b, c = (np.load(tmp_path / f"{n}.npz")["z"] for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_encode_npz_and_png_folder_then_decode(models, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", x=images, y=np.arange(5))
    enc = models["encoder"]
    assert run("encode", tmp_path / "images.npz", "--model", enc, "--out", tmp_path / "l.npz") == 0
    latents = dict(np.load(tmp_path / "l.npz"))
    x = images[:, None].astype(np.float32) / 255
    mu, logvar = runtime.open_session(enc, "cpu").run({"x": x})
    np.testing.assert_allclose(latents["mu"], mu, atol=1e-6)
    np.testing.assert_allclose(latents["logvar"], logvar, atol=1e-6)
    np.testing.assert_array_equal(latents["y"], np.arange(5))

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    assert run("encode", folder, "--model", enc, "--out", tmp_path / "lf.npz") == 0
    from_pngs = np.load(tmp_path / "lf.npz")
    np.testing.assert_allclose(from_pngs["mu"], mu, atol=1e-6)
    assert list(from_pngs["names"]) == [f"{i:02d}.png" for i in range(5)]

    assert (
        run(
            "decode", tmp_path / "l.npz", "--model", models["decoder"], "--out", tmp_path / "d.npz"
        )
        == 0
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "d.npz")["x_mean"], decode(models, mu), atol=1e-6
    )
    assert (
        run(
            "decode", tmp_path / "l.npz", "--model", models["decoder"], "--out", tmp_path / "d.png"
        )
        == 0
    )
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")


def test_interpolate_random_pairs_and_given_endpoints(models, tmp_path):
    dec = models["decoder"]
    args = ("--model", dec, "--steps", 5, "--pairs", 3)
    assert run("interpolate", *args, "--out", tmp_path / "i.npz") == 0
    z = np.load(tmp_path / "i.npz")["z"]
    assert z.shape == (3, 5, 3)
    # slerp keeps the endpoints and stays near the sphere the endpoints lie on
    assert np.linalg.norm(z[:, 2], axis=1).min() > 0.3 * np.linalg.norm(z[:, 0], axis=1).min()
    np.savez(tmp_path / "lat.npz", z=np.eye(3, dtype=np.float32))
    common = ("--model", dec, "--steps", 3, "--latents", tmp_path / "lat.npz", "--index", 0, 2)
    assert run("interpolate", *common, "--method", "lerp", "--out", tmp_path / "j.npz") == 0
    got = np.load(tmp_path / "j.npz")
    np.testing.assert_allclose(got["z"][0], [[1, 0, 0], [0.5, 0, 0.5], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(got["x_mean"], decode(models, got["z"][0]), atol=1e-6)
    assert run("interpolate", *common, "--out", tmp_path / "j.png") == 0


def test_info_shows_providers_opset_and_metadata(models, capsys):
    assert run("info", models["decoder"]) == 0
    out = capsys.readouterr().out
    assert "CPUExecutionProvider" in out and "CUDA provider:" in out
    assert "opset ai.onnx 18" in out and "input  z: tensor(float) [batch, 3]" in out
    assert "latent_dim: 3" in out and "dataset: digits" in out


def test_precision_picks_the_variant_file(models, tmp_path, capsys):
    args = ("generate", "--model", models["decoder"], "--out", tmp_path / "q.npz")
    assert run(*args, "--precision", "int8") == 0
    assert "decoder.int8.onnx on CPUExecutionProvider" in capsys.readouterr().out
    assert run(*args, "--precision", "fp16") == 2
    assert "decoder.fp16.onnx, which does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["generate", "encode", "decode", "interpolate", "info", "score"]
)
def test_every_command_has_help(command, capsys):
    assert run(command, "--help") == 0
    assert "--provider" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("generate", "--model", "{tmp}/none.onnx", "--out", "{tmp}/g.png"), "does not exist"),
        (("generate", "--model", "{dec}", "--out", "{tmp}/g.jpg"), "must end in .png or .npz"),
        (
            ("decode", "{tmp}/wide.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"),
            r"shape \[4, 5\]",
        ),
        (("decode", "{tmp}/nan.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"), "NaN"),
        (("decode", "{tmp}/empty.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"), "empty"),
        (("decode", "{tmp}/text.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"), "strings"),
        (
            ("decode", "{tmp}/nokey.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"),
            "expected one",
        ),
        (
            ("decode", "{tmp}/junk.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"),
            "not a readable",
        ),
        (("encode", "{tmp}/grey.npz", "--model", "{enc}", "--out", "{tmp}/o.npz"), r"\[0, 1\]"),
        (("encode", "{tmp}", "--model", "{enc}", "--out", "{tmp}/o.npz"), "no .png files"),
        (("encode", "{tmp}/bomb", "--model", "{enc}", "--out", "{tmp}/o.npz"), "refused unread"),
        (("encode", "{tmp}/big", "--model", "{enc}", "--out", "{tmp}/o.npz"), "9x8 pixels"),
        # a graph of another role where one is named: one line saying which it is
        (("generate", "--model", "{prior}", "--out", "{tmp}/g.png"), "is a prior; .* decoder"),
        (
            ("generate", "--model", "{dec}", "--prior", "{enc}", "--out", "{tmp}/g.png"),
            "--prior .* is an encoder",
        ),
        (("decode", "{tmp}/ok.npz", "--model", "{enc}", "--out", "{tmp}/o.npz"), "an encoder"),
        (("encode", "{tmp}/x.npz", "--model", "{dec}", "--out", "{tmp}/o.npz"), "needs the enc"),
        (("score", "{tmp}/x.npz", "--model", "{enc}", "--out", "{tmp}/o.npz"), "needs the scorer"),
        (("interpolate", "--model", "{enc}", "--out", "{tmp}/i.png"), "needs the decoder"),
    ],
)
def test_bad_input_is_one_error_line(models, tmp_path, capsys, argv, message):
    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "a.png").write_bytes(_png_header(100_000, 100_000))
    (tmp_path / "big").mkdir()
    Image.new("L", (9, 8)).save(tmp_path / "big" / "a.png")
    np.savez(tmp_path / "ok.npz", z=np.zeros((2, 3), np.float32))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    np.savez(tmp_path / "wide.npz", z=np.zeros((4, 5), np.float32))
    np.savez(tmp_path / "nan.npz", z=np.full((2, 3), np.nan, np.float32))
    np.savez(tmp_path / "empty.npz", z=np.zeros((0, 3), np.float32))
    np.savez(tmp_path / "text.npz", z=np.array([["a", "b", "c"]]))
    np.savez(tmp_path / "nokey.npz", w=np.zeros((2, 3)))
    np.savez(tmp_path / "grey.npz", x=np.full((2, 1, 8, 8), 3.0))
    (tmp_path / "junk.npz").write_text("junk")
    subs = {"tmp": tmp_path, **{k[:3] if k != "prior" else k: v for k, v in models.items()}}
    assert run(*(a.format(**subs) for a in argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("command", ["generate", "interpolate"])
@pytest.mark.parametrize("seed", ["-1", str(2**32), "x"])
def test_a_seed_numpy_cannot_take_is_a_usage_error(models, tmp_path, capsys, command, seed):
    argv = (command, "--seed", seed, "--model", models["decoder"], "--out", tmp_path / "o.png")
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "error: argument --seed:" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(runtime.cuda_status()[0], reason="this machine has a usable CUDA provider")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_gpu_says_why(models, tmp_path, capsys, provider):
    out = tmp_path / "g.png"
    assert run("generate", "--model", models["decoder"], "--provider", provider, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: provider '{provider}' requested but ")
    assert not out.exists()


def test_precision_auto_keeps_fp32_on_the_cpu(models, tmp_path, capsys):
    assert run("generate", "--model", models["decoder"], "--out", tmp_path / "g.png") == 0
    assert f"onnxruntime: {models['decoder']} on CPUExecutionProvider" in capsys.readouterr().out


@pytest.mark.skipif(runtime.cuda_status()[0], reason="this machine has a usable CUDA provider")
def test_cuda_without_gpu_says_why(models, tmp_path, capsys):
    args = (
        "generate",
        "--model",
        models["decoder"],
        "--provider",
        "cuda",
        "--out",
        tmp_path / "g.png",
    )
    assert run(*args) == 2
    assert "error: provider 'cuda' requested but" in capsys.readouterr().err


def test_console_script_runs_without_torch(models, tmp_path):
    """`vaepipe generate` as users run it: no torch import, provider printed, clean errors."""
    code = (
        "import sys; from vaepipe import cli; rc = cli.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    out = tmp_path / "g.png"
    cmd = [
        sys.executable,
        "-c",
        code,
        "generate",
        "--model",
        str(models["decoder"]),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider" in proc.stdout and out.is_file()

    script = BIN / "vaepipe"
    if not script.exists():
        pytest.skip(f"console script not installed beside {sys.executable}")
    bad = subprocess.run(
        [
            str(script),
            "decode",
            str(tmp_path / "missing.npz"),
            "--model",
            str(models["decoder"]),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and "missing.npz does not exist" in bad.stderr


def _npz_claiming_rows(path: Path, rows: int, width: int) -> None:
    """An .npz whose z.npy header says [rows, width] float32 but holds no data: only a reader
    that allocates before checking would notice the size the hard way."""
    import zipfile

    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, width)}
    with zipfile.ZipFile(path, "w") as zf, zf.open("z.npy", "w") as f:
        np.lib.format.write_array_header_2_0(f, header)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--n", 100_000_000, "--out", "{tmp}/s.npz"], "--n = 100,000,000 needs"),
        (["generate", "--n", 1_000_000, "--out", "{tmp}/g.png"], "--n = 1,000,000 images make"),
        (
            ["interpolate", "--pairs", 10**9, "--steps", 10, "--out", "{tmp}/i.npz"],
            "--pairs x --steps = 10,000,000,000 needs",
        ),
        (["decode", "{tmp}/huge.npz", "--out", "{tmp}/d.npz"], "file {tmp}/huge.npz needs"),
    ],
)
def test_sizes_beyond_memory_end_with_the_value_and_the_limit(
    models, tmp_path, capsys, argv, message
):
    import time

    _npz_claiming_rows(tmp_path / "huge.npz", 10**10, 3)
    argv = [str(a).format(tmp=tmp_path) for a in argv]
    model = models["decoder"]
    start = time.perf_counter()
    assert run(*argv, "--model", model) == 2
    assert time.perf_counter() - start < 5  # refused up front, not after allocating
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message.format(tmp=tmp_path) in err[0] and "limit" in err[0]
    assert not list(tmp_path.glob("[sgid].*"))  # nothing written


def test_files_written_by_the_cli_follow_the_umask(models, tmp_path):
    import os
    import stat

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        previous = os.umask(mask)
        try:
            out = tmp_path / f"g{mask:o}.png"
            assert run("generate", "--model", models["decoder"], "--n", 4, "--out", out) == 0
            npz = tmp_path / f"s{mask:o}.npz"
            assert run("generate", "--model", models["decoder"], "--n", 4, "--out", npz) == 0
        finally:
            os.umask(previous)
        assert stat.S_IMODE(out.stat().st_mode) == mode
        assert stat.S_IMODE(npz.stat().st_mode) == mode


def test_reconstruct_draws_each_row_of_originals_above_its_reconstructions(
    models, tmp_path, capsys
):
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", x=x)
    common = ("--model", models["encoder"], "--decoder", models["decoder"], "--n", 12)
    assert run("reconstruct", tmp_path / "x.npz", *common, "--out", tmp_path / "r.npz") == 0
    with np.load(tmp_path / "r.npz") as f:
        xs, mu, recon = f["x"], f["mu"], f["x_mean"]
    assert xs.shape == (12, 1, 8, 8) and mu.shape == (12, 3)
    np.testing.assert_allclose(xs[:, 0], x[:12] / 255.0, atol=1e-6)
    np.testing.assert_allclose(recon, decode(models, mu), atol=1e-6)
    out = tmp_path / "r.png"
    assert run("reconstruct", tmp_path / "x.npz", *common, "--cols", 6, "--out", out) == 0
    assert "12 images" in capsys.readouterr().out
    with Image.open(out) as im:  # 4 rows (input, recon., input, recon.) of 6, 12x, a margin
        assert im.size == (60 + 12 * (6 * 10 + 2), 12 * (4 * 10 + 2))
        img = np.asarray(im)
    tile = img[24 : 24 + 96 : 12, 60 + 24 : 60 + 24 + 96 : 12]  # first original, first row
    np.testing.assert_allclose(tile / 255.0, xs[0, 0], atol=1 / 255)
    below = img[24 + 120 : 24 + 120 + 96 : 12, 60 + 24 : 60 + 24 + 96 : 12]  # under it
    np.testing.assert_allclose(below / 255.0, recon[0, 0], atol=1 / 255)
    assert (img[:, :60] < 128).any()  # the row names are written in the margin


def test_read_only_commands_outside_a_project_say_where_to_run_and_create_nothing(tmp_path):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    here = tmp_path / "elsewhere"
    here.mkdir()
    for argv in (
        ["runs"],
        ["promote"],
        ["generate", "--out", "g.png"],
        ["generate", "--model", "models:/vae-decoder@champion", "--out", "g.png"],
    ):
        proc = subprocess.run(
            [BIN / "vaepipe", *argv], cwd=here, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0, argv
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "dvc repro" in lines[0], lines
        assert list(here.iterdir()) == [], argv  # no store, no file
