"""`vaepipe site`: contract checks at build time, and the page in a real headless Chromium.

The browser tests serve a built site with `python -m http.server` on 127.0.0.1 and drive
Debian's chromium through chromedriver (selenium); they skip only when chromium or chromedriver
cannot be found. They need onnxruntime-web from `make web`. VAEPIPE_SITE_SCREENSHOT=docs/site.png
also saves a screenshot of the page.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import chromium
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ROOT, fake_ort_web, vae_cfg

from vaepipe.evaluation import collapse, likelihood
from vaepipe.export import graphs, variants
from vaepipe.inference import site
from vaepipe.model import gaussian
from vaepipe.model.vae import VAE

RUNTIME = ROOT / site.RUNTIME_DIR
SCREENSHOT = os.environ.get("VAEPIPE_SITE_SCREENSHOT")
META = {"dataset": "digits", "git_commit": "248cac0", "mlflow_run_id": "9f1c2b7d4e5a"}
TIMEOUT = 30  # seconds for any one wait on the browser or the server


def _vae(image_shape, latent_dim, hidden) -> VAE:
    """An MLP VAE with a Bernoulli likelihood (params.yaml's options) of the given size."""
    cfg = vae_cfg(
        image_shape, latent_dim=latent_dim, hidden=hidden, arch="mlp", likelihood="bernoulli"
    )
    return VAE(cfg)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> dict:
    """A decoder trained briefly on scikit-learn's 8x8 digits (so the pictures mean something),
    its IWAE NLL (k = 100, all 1,797 images) in the metadata, and evaluate-style
    kl_per_dim.json rows measured on the same images (activity > 0.01: active)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    vae = _vae((1, 8, 8), 8, [64])
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(600):
        batch = x[torch.randint(0, len(x), (128,))]
        logits, mu, logvar = vae(batch)
        loss = (
            vae.likelihood.nll(batch, logits).mean()
            + gaussian.kl_per_dim(mu, logvar).sum(-1).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        kl, activity = gaussian.kl_per_dim(mu, logvar).mean(0), collapse.activity(mu)
        nll = -likelihood.iwae_log_likelihood(vae, x, k=100, seed=0).mean().item()
    nll_meta = {"test_nll_iwae": nll, "test_nll_iwae_k": 100, "test_nll_iwae_n": len(x)}
    out = tmp_path_factory.mktemp("digits")
    paths = graphs.export_models(vae, out, opset=18, metadata={**META, **nll_meta})
    paths["nll_text"] = f"{nll:.2f} nats (IWAE, k=100, n={len(x)})"
    rows = [
        {"dim": d, "kl": float(k), "activity": float(a), "active": bool(a > 0.01)}
        for d, (k, a) in enumerate(zip(kl, activity, strict=True))
    ]
    paths["kl_per_dim"] = out / "kl_per_dim.json"
    paths["kl_per_dim"].write_text(json.dumps(rows))
    return paths


def _vaepipe_site(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vaepipe.cli", "site", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _edited(src: Path, dst: Path, edit) -> Path:
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


def _rename_input(model):
    model.graph.input[0].name = "latent"
    for node in model.graph.node:
        node.input[:] = ["latent" if i == "z" else i for i in node.input]


# --- the build ---------------------------------------------------------------------------------


def test_build_writes_the_whole_site(digits_model, tmp_path):
    runtime = fake_ort_web(tmp_path)
    kl = digits_model["kl_per_dim"]
    out = tmp_path / "site"
    args = ["--decoder", str(digits_model["decoder"]), "--runtime", str(runtime)]
    proc = _vaepipe_site("--out", str(out), "--kl-per-dim", str(kl), *args)
    assert proc.returncode == 0, proc.stderr
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    expected = {*site.PAGE_FILES, "decoder.onnx", "model.json", "ort", site.MANIFEST}
    assert names == expected | {f"ort/{f}" for f in site.RUNTIME_FILES}
    assert (out / "decoder.onnx").read_bytes() == digits_model["decoder"].read_bytes()
    config = json.loads((out / "model.json").read_text())
    assert config["latent_dim"] == 8 and config["image_shape"] == [1, 8, 8]
    assert config["runtime"]["version"] == "0.0.0-test"
    assert config["card"]["nll"] == digits_model["nll_text"]
    assert config["card"]["run_id"] == META["mlflow_run_id"]
    rows = json.loads(kl.read_text())
    by_activity = sorted(rows, key=lambda r: -r["activity"])
    assert [r["dim"] for r in config["dims"]["rows"]] == [r["dim"] for r in by_activity]
    assert config["dims"]["hide_inactive"]
    # a rebuild replaces the earlier site's files (and only those: test_site_rebuild.py), and a
    # missing default KL file lists dims in order
    assert _vaepipe_site("--out", str(out), *args).returncode == 0
    dims = json.loads((out / "model.json").read_text())["dims"]
    assert [r["dim"] for r in dims["rows"]] == list(range(8)) and "index order" in dims["note"]


def test_site_command_imports_neither_torch_nor_matplotlib(digits_model, tmp_path):
    script = (
        "import sys; from vaepipe import cli; cli.main(sys.argv[1:]); "
        "heavy = {'torch', 'matplotlib'} & set(sys.modules); assert not heavy, heavy"
    )
    args = ["--out", str(tmp_path / "site"), "--decoder", str(digits_model["decoder"])]
    args += ["--runtime", str(fake_ort_web(tmp_path))]
    proc = subprocess.run(
        [sys.executable, "-c", script, "site", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "serve it: python -m http.server" in proc.stdout


def test_site_is_also_an_artifact_of_the_run(digits_model, tmp_path):
    """--log-run: the folder goes to the pipeline's MLflow run as site/, and what
    `mlflow artifacts download` gives back is the same page."""
    import mlflow
    from helpers import ROOT

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("vaepipe", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "train.json").write_text(json.dumps({"run_id": run_id}))
    args = ["--out", "site", "--decoder", str(digits_model["decoder"])]
    args += ["--runtime", str(fake_ort_web(tmp_path)), "--log-run"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "vaepipe.cli", "site", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"logged to MLflow run {run_id} as site/" in proc.stdout
    got = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="site", dst_path=str(tmp_path / "down"), tracking_uri=uri
    )
    for name in (*site.PAGE_FILES, "decoder.onnx", "model.json"):
        assert (Path(got) / name).read_bytes() == (tmp_path / "site" / name).read_bytes()


def test_fp16_variant_travels_with_the_decoder(digits_model, tmp_path):
    decoder = tmp_path / "decoder.onnx"
    shutil.copy(digits_model["decoder"], decoder)
    variants.to_fp16(decoder, tmp_path / "decoder.fp16.onnx")
    config = site.build_site(tmp_path / "site", decoder, fake_ort_web(tmp_path))
    assert config["models"] == {"fp32": "decoder.onnx", "fp16": "decoder.fp16.onnx"}
    assert (tmp_path / "site" / "decoder.fp16.onnx").is_file()


def test_model_card_says_n_a_for_what_the_metadata_lacks():
    card = site.model_card({"dataset": "mnist", "likelihood": "bernoulli", "opset": "18"})
    assert card["nll"] == card["run_id"] == card["git_commit"] == "n/a"
    assert site.model_card({"test_nll_iwae": "229.731"})["nll"] == "229.73 nats (IWAE)"


def test_per_dim_kl_from_metadata_orders_by_kl_and_hides_none():
    dims = site.latent_dims({"kl_per_dim": "[0.1, 2.5, 0.0]"}, 3, None)
    assert [r["dim"] for r in dims["rows"]] == [1, 0, 2] and not dims["hide_inactive"]


def test_prior_sample_is_standard_normal_and_scales_with_temperature():
    z = site.prior_sample(3, 1000, 101, 1.0)  # odd width: pairs run across rows
    assert z.dtype == np.float32 and z.shape == (1000, 101)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.05  # a normal's fourth moment, not a uniform's 1.8
    np.testing.assert_allclose(
        site.prior_sample(3, 10, 7, 0.5), 0.5 * z.ravel()[:70].reshape(10, 7)
    )
    assert not np.array_equal(site.prior_sample(4, 2, 3), site.prior_sample(3, 2, 3))


def _bad_inputs(decoder: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    no_meta = _edited(decoder, tmp / "nometa.onnx", lambda m: m.metadata_props.clear())
    renamed = _edited(decoder, tmp / "renamed.onnx", _rename_input)
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    wrong_kl = tmp / "kl.json"
    wrong_kl.write_text(json.dumps([{"dim": 0, "kl": 1, "activity": 1, "active": True}]))
    return {
        "wrong input name": (["--decoder", str(renamed)], "one input 'z'"),
        "no metadata": (["--decoder", str(no_meta)], "metadata_props lack latent_dim"),
        "not ONNX": (["--decoder", str(garbage)], "is not an ONNX model"),
        "missing decoder": (["--decoder", str(tmp / "none.onnx")], "does not exist"),
        "runtime missing": (["--runtime", str(tmp / "empty")], "run `make web`"),
        "KL of another model": (["--kl-per-dim", str(wrong_kl)], "latent_dim 8"),
    }


def test_bad_input_fails_with_one_error_line_and_keeps_the_old_site(digits_model, tmp_path):
    runtime = fake_ort_web(tmp_path)
    out = tmp_path / "site"
    good = ["--out", str(out), "--decoder", str(digits_model["decoder"])]
    assert _vaepipe_site(*good, "--runtime", str(runtime)).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for case, (args, message) in _bad_inputs(digits_model["decoder"], tmp_path).items():
        proc = _vaepipe_site(*good, "--runtime", str(runtime), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (case, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], case
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, case
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_refuses_to_replace_a_folder_it_did_not_build(digits_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    args = ["--decoder", str(digits_model["decoder"]), "--runtime", str(fake_ort_web(tmp_path))]
    proc = _vaepipe_site("--out", str(tmp_path), *args)
    assert proc.returncode == 2 and "is not a site `vaepipe site` built" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- the page in Chromium ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(digits_model, tmp_path_factory):
    """Sites under one static server: ok/ (the digits model), nomodel/ (its decoder deleted)."""
    chromium.browser_paths()
    if not all((RUNTIME / f).is_file() for f in site.RUNTIME_FILES):
        pytest.fail(f"onnxruntime-web is not installed in {RUNTIME}: run `make web`")
    root = tmp_path_factory.mktemp("www")
    kl = digits_model["kl_per_dim"]
    site.build_site(root / "ok", digits_model["decoder"], RUNTIME, kl)
    shutil.copytree(root / "ok", root / "nomodel")
    (root / "nomodel" / "decoder.onnx").unlink()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{url}/ok/model.json", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


def _chrome(tmp: Path, *flags: str):
    return chromium.chrome(tmp, *flags, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def browser(served, tmp_path_factory):
    b = _chrome(tmp_path_factory.mktemp("chrome"), "--disable-gpu")
    yield b
    b.quit()


def _open(browser, url: str) -> dict:
    """Load the page; once it is ready or has failed: window.vaepipe."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, TIMEOUT).until(
        lambda b: b.execute_script("return window.vaepipe && window.vaepipe.state !== 'loading'")
    )
    return browser.execute_script("return window.vaepipe")


def _when_idle(browser) -> dict:
    return browser.execute_async_script(
        "const done = arguments[0]; vaepipe.whenIdle().then(() => done(window.vaepipe))"
    )


def _decode(decoder: Path, z) -> np.ndarray:
    sess = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    return sess.run(None, {"z": np.asarray(z, np.float32)})[0]


def _check_matches_python(page: dict, decoder: Path, atol: float = 1e-4) -> None:
    d = page["grid"]["shape"]
    z = np.asarray(page["grid"]["z"], np.float32).reshape(d[0], -1)
    expected_z = site.prior_sample(
        page["grid"]["seed"], d[0], z.shape[1], page["grid"]["temperature"]
    )
    np.testing.assert_allclose(z, expected_z, atol=1e-6)  # the page's PRNG = prior_sample
    x = np.asarray(page["grid"]["x"], np.float32).reshape(d)
    np.testing.assert_allclose(x, _decode(decoder, z), atol=atol)
    zi = np.asarray(page["interpolation"]["z"], np.float32).reshape(8, -1)
    xi = np.asarray(page["interpolation"]["x"], np.float32).reshape(8, *d[1:])
    np.testing.assert_allclose(xi, _decode(decoder, zi), atol=atol)
    np.testing.assert_allclose(
        zi[[0, -1]], z[[page["interpolation"]["a"], page["interpolation"]["b"]]], atol=1e-6
    )


def test_page_decodes_what_onnxruntime_decodes(browser, served, digits_model):
    url, _ = served
    page = _open(browser, f"{url}/ok/")
    assert page["state"] == "ready", page["error"]
    assert page["backend"] in ("wasm", "webgpu")
    status = browser.find_element("id", "status").text
    assert f"running on {page['backend']}" in status
    _check_matches_python(page, digits_model["decoder"])
    # what the canvases show: x_mean as 8-bit grey, pixel for pixel
    pixels = browser.execute_script(
        "return [...document.querySelectorAll('#grid canvas')].map(c => Array.from("
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data))"
    )
    x = np.asarray(page["grid"]["x"], np.float64).reshape(16, 64)
    grey = np.clip(np.floor(x * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(np.asarray(pixels).reshape(16, 64, 4)[..., 0], grey)
    # everything came from the site itself: no CDN, works offline
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert f"{url}/ok/ort/ort-wasm-simd-threaded.asyncify.wasm" in fetched
    assert all(u.startswith(f"{url}/ok/") for u in fetched), fetched
    card = browser.find_element("id", "card").text
    for text in ("digits", digits_model["nll_text"], META["mlflow_run_id"], META["git_commit"]):
        assert text in card


def test_seed_and_temperature_redraw_the_grid(browser, served, digits_model):
    from selenium.webdriver.common.keys import Keys

    url, _ = served
    _open(browser, f"{url}/ok/")
    seed = browser.find_element("id", "seed")
    seed.clear()
    seed.send_keys("1234", Keys.ENTER)
    browser.execute_script(
        "const t = document.getElementById('temperature'); t.value = 0.5;"
        "t.dispatchEvent(new Event('input'))"
    )
    page = _when_idle(browser)
    assert (page["grid"]["seed"], page["grid"]["temperature"]) == (1234, 0.5)
    _check_matches_python(page, digits_model["decoder"])


def test_sliders_follow_activity_and_a_move_redraws(browser, served, digits_model):
    from selenium.webdriver.common.keys import Keys

    url, _ = served
    page = _open(browser, f"{url}/ok/")
    rows = sorted(json.loads(digits_model["kl_per_dim"].read_text()), key=lambda r: -r["activity"])
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#sliders input')].map(i => Number(i.dataset.dim))"
    )
    assert shown == [r["dim"] for r in rows if r["active"]]
    inactive = [r["dim"] for r in rows if not r["active"]]
    assert inactive, "the digits model should leave some dims inactive"
    toggle = browser.find_element("id", "inactive-toggle")
    assert toggle.text == f"show {len(inactive)} inactive dims"
    before = page["focus"]["x"]
    slider = browser.find_element("css selector", "#sliders input")
    slider.send_keys(*[Keys.ARROW_RIGHT] * 40)  # a real key press, 0.4 in z
    page = _when_idle(browser)
    assert page["decodes"] >= 1 and page["focus"]["x"] != before
    np.testing.assert_allclose(
        np.asarray(page["focus"]["x"], np.float32).reshape(1, 1, 8, 8),
        _decode(digits_model["decoder"], [page["focus"]["z"]]),
        atol=1e-4,
    )
    if SCREENSHOT:
        _save_full_page(browser, Path(SCREENSHOT))


def _save_full_page(browser, path: Path) -> None:
    """A PNG of the whole page, below the window's fold too (DevTools' captureScreenshot)."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_missing_model_file_shows_a_message(browser, served):
    url, _ = served
    page = _open(browser, f"{url}/nomodel/")
    assert page["state"] == "error" and "decoder.onnx" in page["error"]
    assert "HTTP 404" in browser.find_element("id", "status").text


def test_no_webassembly_shows_a_message(served, tmp_path):
    """V8 without its JIT (as in Edge's enhanced security mode) exposes no WebAssembly."""
    url, _ = served
    b = _chrome(tmp_path, "--disable-gpu", "--js-flags=--jitless")
    try:
        page = _open(b, f"{url}/ok/")
        assert page["state"] == "error"
        assert "no WebAssembly" in b.find_element("id", "status").text
    finally:
        b.quit()


def test_each_slider_move_decodes_and_draws_once(served, tmp_path):
    """The README's default decoder size (MLP 32-256-512-784), 50 slider moves in the page: one
    timed decode and drawing per move (the figure is printed; docs/site.md has the measurement)."""
    url, root = served
    torch.manual_seed(0)
    paths = graphs.export_models(
        _vae((1, 28, 28), 32, [512, 256]).eval(), tmp_path, opset=18, metadata=META
    )
    site.build_site(root / "big", paths["decoder"], RUNTIME)
    b = _chrome(tmp_path / "chrome", "--disable-gpu")
    try:
        assert _open(b, f"{url}/big/")["state"] == "ready"
        moves = b.execute_async_script(
            """const done = arguments[0];
            (async () => {
              const input = document.querySelector('#sliders input');
              const start = performance.now();
              for (let i = 0; i < 50; i++) {
                input.value = -3 + i * 0.12;
                input.dispatchEvent(new Event('input'));
                await vaepipe.whenIdle();
              }
              done({timings: vaepipe.timings, wall: performance.now() - start});
            })();"""
        )
    finally:
        b.quit()
    timings = moves["timings"]
    run, drawn = (np.median([t[k] for t in timings]) for k in ("run", "total"))
    # performance.now() is coarsened to 0.1 ms in a page without cross-origin isolation
    print(
        f"\ndecode per slider move (wasm), p50 of {len(timings)}: session.run {run:.2f} ms, "
        f"with drawing {drawn:.2f} ms; mean over the loop {moves['wall'] / 50:.3f} ms"
    )
    assert len(timings) == 50 and all(0 <= t["run"] <= t["total"] for t in timings)


def test_webgpu_backend_when_the_browser_has_it(served, digits_model, tmp_path):
    """SwiftShader's software WebGPU: the same numbers on the other execution provider."""
    url, _ = served
    flags = (
        "--enable-unsafe-webgpu",
        "--enable-unsafe-swiftshader",
        "--use-webgpu-adapter=swiftshader",
        "--enable-features=Vulkan",
    )
    b = _chrome(tmp_path, *flags)
    try:
        page = _open(b, f"{url}/ok/")
    finally:
        b.quit()
    assert page["state"] == "ready", page["error"]
    if page["backend"] != "webgpu":
        pytest.skip(
            f"this Chromium offers no WebGPU adapter, even SwiftShader's ({page['backendReason']})"
        )
    _check_matches_python(page, digits_model["decoder"])
