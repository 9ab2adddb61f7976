"""`dvc plots show` renders its charts with no network: the project's template (.dvc/plots.html)
loads vega, vega-lite and vega-embed from web/node_modules (`make web`), not from a CDN.
Checked in a real headless Chromium whose every network request goes to a dead proxy."""

import os
from pathlib import Path

import chromium
import pytest
from helpers import sh

ROOT = Path(__file__).resolve().parents[2]
VEGA = ROOT / "web" / "node_modules" / "vega-embed" / "build" / "vega-embed.min.js"
TRAIN_CHARTS = 4  # dvc.yaml: ELBO, reconstruction NLL, KL and loss of plots/train/curves.json


def test_dvc_plots_show_renders_the_training_curves_offline(new_project, tmp_path):
    if not VEGA.is_file():
        pytest.skip("web/node_modules has no vega-embed: run `make web`")
    repo = new_project("plots")
    (repo / "web").symlink_to(ROOT / "web")  # a clone has web/ in it; the sandbox copies none
    sh(repo, "dvc", "repro", "train", timeout=600)
    shown = sh(repo, "dvc", "plots", "show", timeout=300)
    page = repo / "dvc_plots" / "index.html"
    assert page.is_file(), shown.stdout + shown.stderr
    html = page.read_text()
    assert "web/node_modules/vega-embed" in html and "{scripts}" not in html
    assert "dvc_plots" in sh(repo, "git", "check-ignore", "dvc_plots").stdout
    browser = chromium.chrome(
        tmp_path / "chrome",
        "--disable-gpu",
        "--proxy-server=http://127.0.0.1:9",  # nothing listens: no request leaves the machine
        "--proxy-bypass-list=<-loopback>",
        "--allow-file-access-from-files",
        timeout=120,
    )
    try:
        browser.get(page.as_uri())
        from selenium.webdriver.support.ui import WebDriverWait

        charts = "return document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length"
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(charts) >= TRAIN_CHARTS)
        shot = os.environ.get("VAEPIPE_PLOTS_SCREENSHOT")  # to look at it
        if shot:
            browser.save_screenshot(shot)
        fetched = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        drawn = browser.execute_script(  # the colours on each chart's canvas (-1: unreadable)
            "return [...document.querySelectorAll('.vega-embed canvas')].map(c => { try {"
            " return new Set(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
            ".size } catch (e) { return String(e) } })"
        )
    finally:
        browser.quit()
    assert not [u for u in fetched if u.startswith("http")], fetched
    print("colours per canvas:", drawn)
    assert sum(isinstance(n, int) and n > 2 for n in drawn) >= TRAIN_CHARTS, drawn
    assert "ELBO (nats)" in html
