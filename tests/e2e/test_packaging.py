"""pyproject's dependencies resolve on the platforms users have: onnxruntime-gpu on x86-64 Linux
and Windows, onnxruntime on macOS and ARM, and every direct dependency has a wheel there.

pip evaluates environment markers against the interpreter running it, even with --platform, so
the markers are evaluated here for each target (packaging.markers), and pip's --dry-run
--platform then checks that a wheel of every requirement that applies exists for it.
"""

import json
import subprocess
import sys

import pytest
from helpers import ROOT
from packaging.requirements import Requirement

# marker environment, pip --platform tags (newest first, as wheels are tagged), the runtime
TARGETS = {
    "linux-x86_64": (
        {"sys_platform": "linux", "platform_machine": "x86_64"},
        ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64"],
        "onnxruntime-gpu",
    ),
    "windows-amd64": (
        {"sys_platform": "win32", "platform_machine": "AMD64"},
        ["win_amd64"],
        "onnxruntime-gpu",
    ),
    "macos-arm64": (
        {"sys_platform": "darwin", "platform_machine": "arm64"},
        ["macosx_14_0_arm64", "macosx_13_0_arm64", "macosx_11_0_arm64"],
        "onnxruntime",
    ),
    "linux-aarch64": (
        {"sys_platform": "linux", "platform_machine": "aarch64"},
        ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64"],
        "onnxruntime",
    ),
}


def requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def applying(env: dict) -> list[Requirement]:
    full = {"python_version": "3.11", "platform_system": "", "os_name": "", **env}
    return [r for r in requirements() if r.marker is None or r.marker.evaluate(full)]


@pytest.mark.parametrize("target", TARGETS)
def test_markers_pick_the_onnxruntime_build_of_each_platform(target):
    env, _, runtime = TARGETS[target]
    names = {r.name for r in applying(env)}
    assert runtime in names
    assert not ({"onnxruntime", "onnxruntime-gpu"} - {runtime}) & names


@pytest.mark.parametrize("target", TARGETS)
def test_every_dependency_has_a_wheel_for_the_platform(target, tmp_path):
    env, platforms, runtime = TARGETS[target]
    specs = [f"{r.name}{r.specifier}" for r in applying(env)]
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
        "--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
        "--target", str(tmp_path / "t"), "--report", str(report),
        *[a for p in platforms for a in ("--platform", p)],
        *specs,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and (
        "Network is unreachable" in proc.stderr or "NewConnection" in proc.stderr
    ):
        pytest.skip(f"PyPI is unreachable from here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen = {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}
    assert set(chosen) == {r.name.lower() for r in applying(env)}
    wheel = chosen[runtime]["download_info"]["url"].rsplit("/", 1)[-1]
    assert wheel.endswith(".whl") and any(
        tag in wheel for tag in ("win_amd64", "manylinux", "macosx")
    )
