"""`vaepipe site` on a folder it built before, and --log-run on runs in every state, through the
real console script: a rebuild replaces only the files the earlier build wrote (all of them or
none), and logging the site to a run leaves the run's status and end time alone."""

import itertools
import json
import os
import sys
from pathlib import Path

import onnx
import pytest
from helpers import fake_ort_web

from vaepipe.export import variants
from vaepipe.inference import site

VAEPIPE = Path(sys.executable).with_name("vaepipe")
USER_FILES = {"NOTES.md": "# my notes\n", "data/user.csv": "a,b\n1,2\n", "ort/mine.txt": "x\n"}


def _vaepipe_site(*args: str, cwd: Path | None = None, env: dict | None = None):
    import subprocess

    cmd = [str(VAEPIPE), "site", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _decoder(src: Path, dst: Path, fp16: bool = False, **meta: str) -> Path:
    """A copy of `src` with metadata `meta` set (other bytes, another card), and its fp16 twin."""
    model = onnx.load(str(src))
    for key, value in meta.items():
        prop = next((p for p in model.metadata_props if p.key == key), None)
        prop = prop or model.metadata_props.add(key=key)
        prop.value = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    if fp16:
        variants.to_fp16(dst, dst.with_name(f"{dst.stem}.fp16{dst.suffix}"))
    return dst


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root`: a file's bytes, None for a folder."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in root.rglob("*")
    }


def _leftovers(out: Path) -> list[str]:
    """Temp files of the build: inside `out`, or beside it in its parent."""
    inside = [n for n in _tree(out) if ".tmp" in n or ".old" in n]
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return inside + beside


@pytest.fixture
def built(tiny_decoder, tmp_path) -> dict:
    """A site built from a decoder with an fp16 twin, then the user's own files added to it."""
    runtime = fake_ort_web(tmp_path)
    first = _decoder(tiny_decoder, tmp_path / "a" / "decoder.onnx", fp16=True, dataset="first")
    out = tmp_path / "www" / "site"
    proc = _vaepipe_site("--out", str(out), "--decoder", str(first), "--runtime", str(runtime))
    assert proc.returncode == 0, proc.stderr
    assert (out / "decoder.fp16.onnx").is_file()
    for name, text in USER_FILES.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return {"out": out, "runtime": runtime, "tmp": tmp_path, "decoder": tiny_decoder}


def test_rebuild_keeps_the_users_files_and_replaces_the_sites(built):
    out, tmp = built["out"], built["tmp"]
    second = _decoder(built["decoder"], tmp / "b" / "decoder.onnx", dataset="second")
    proc = _vaepipe_site(
        "--out", str(out), "--decoder", str(second), "--runtime", str(built["runtime"])
    )
    assert proc.returncode == 0, proc.stderr
    for name, text in USER_FILES.items():
        assert (out / name).read_text() == text, name
    assert (out / "decoder.onnx").read_bytes() == second.read_bytes()
    config = json.loads((out / "model.json").read_text())
    assert config["card"]["dataset"] == "second" and config["models"]["fp16"] is None
    assert not (out / "decoder.fp16.onnx").exists()  # the earlier build's, not this one's
    site_files = {*site.PAGE_FILES, "decoder.onnx", "model.json"}
    site_files |= {f"ort/{f}" for f in site.RUNTIME_FILES}
    files = {n for n, data in _tree(out).items() if data is not None}
    assert files == site_files | set(USER_FILES) | {site.MANIFEST}
    assert set(json.loads((out / site.MANIFEST).read_text())["files"]) == site_files
    assert _leftovers(out) == []


def _failing_rebuilds(built) -> dict[str, tuple[list[str], str]]:
    tmp, out = built["tmp"], built["out"]
    renamed = _decoder(built["decoder"], tmp / "bad" / "decoder.onnx")
    model = onnx.load(str(renamed))
    model.graph.input[0].name = "latent"
    for node in model.graph.node:
        node.input[:] = ["latent" if i == "z" else i for i in node.input]
    onnx.save(model, str(renamed))
    with_fp16 = _decoder(built["decoder"], tmp / "c" / "decoder.onnx", fp16=True)
    return {
        "decoder breaks the contract": (["--decoder", str(renamed)], "one input 'z'"),
        "--out is a file": (["--out", str(out / "NOTES.md")], "is not a folder"),
        "--out inside a file": (["--out", str(out / "NOTES.md" / "x")], "NOTES.md"),
        "a user's file where the site writes": (
            ["--decoder", str(with_fp16)],
            "decoder.fp16.onnx",
        ),
    }


def test_a_failed_rebuild_leaves_the_folder_as_it_was(built):
    out = built["out"]
    (out / "decoder.fp16.onnx").unlink()  # now the user's name, not the site's...
    proc = _vaepipe_site(
        "--out", str(out), "--decoder", str(built["decoder"]), "--runtime", str(built["runtime"])
    )
    assert proc.returncode == 0, proc.stderr
    (out / "decoder.fp16.onnx").write_text("mine")  # ...which the next fp16 build must keep
    before = _tree(out)
    for case, (args, message) in _failing_rebuilds(built).items():
        default = ["--out", str(out), "--decoder", str(built["decoder"])]
        proc = _vaepipe_site(*default, "--runtime", str(built["runtime"]), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (case, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], case
        assert _tree(out) == before, case
        assert _leftovers(out) == [], case


def test_an_interrupted_rebuild_leaves_the_folder_as_it_was(built, monkeypatch):
    """Ctrl-C just before or just after each rename of the swap: the earlier site and the
    user's files, as they were."""
    out, tmp = built["out"], built["tmp"]
    second = _decoder(built["decoder"], tmp / "b" / "decoder.onnx", dataset="second")
    before = _tree(out)
    replace, calls = os.replace, []

    def interrupted_at(n: int, after: bool):
        def fake(src, dst):
            calls.append(src)
            if after or len(calls) != n:
                replace(src, dst)
            if len(calls) == n:
                raise KeyboardInterrupt

        return fake

    for n, after in itertools.product(range(1, 40), (False, True)):
        calls.clear()
        monkeypatch.setattr(site.os, "replace", interrupted_at(n, after))
        try:
            site.build_site(out, second, built["runtime"])
        except KeyboardInterrupt:
            assert _tree(out) == before, (n, after)
            assert _leftovers(out) == [], (n, after)
            continue
        finally:
            monkeypatch.setattr(site.os, "replace", replace)
        break  # no rename left to interrupt: the build went through
    assert n > 10, "the swap should rename each file"
    assert (out / "decoder.onnx").read_bytes() == second.read_bytes()


# --- --log-run ---------------------------------------------------------------------------------


def _store(tmp: Path):
    """(client, uri) of a new sqlite store in `tmp`, with the project's params.yaml beside it."""
    import mlflow
    from helpers import ROOT

    (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return mlflow.MlflowClient(uri), uri


@pytest.mark.parametrize("status", ["RUNNING", "FAILED", "KILLED"])
def test_log_run_leaves_the_runs_status_alone(built, status):
    tmp, out = built["tmp"], built["out"]
    client, uri = _store(tmp)
    exp = client.create_experiment("vaepipe", artifact_location=(tmp / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    info = client.get_run(run_id).info
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    args = ["--out", str(out), "--decoder", str(built["decoder"])]
    proc = _vaepipe_site(
        *args, "--runtime", str(built["runtime"]), "--log-run", run_id, cwd=tmp, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert f"logged to MLflow run {run_id} as site/" in proc.stdout
    after = client.get_run(run_id).info
    assert info.status == status and (after.status, after.end_time) == (status, info.end_time)
    logged = {a.path for a in client.list_artifacts(run_id, "site")}
    logged |= {a.path for a in client.list_artifacts(run_id, "site/ort")}
    expected = {f"site/{f}" for f in (*site.PAGE_FILES, "decoder.onnx", "model.json", "ort")}
    assert logged == expected | {f"site/ort/{f}" for f in site.RUNTIME_FILES}  # not the user's
    got = Path(client.download_artifacts(run_id, "site/model.json", str(tmp / "down")))
    assert got.read_bytes() == (out / "model.json").read_bytes()


def test_log_run_to_a_run_the_store_lacks_changes_nothing(built):
    tmp, out = built["tmp"], built["out"]
    client, uri = _store(tmp)
    client.create_experiment("vaepipe", artifact_location=(tmp / "art").as_uri())
    second = _decoder(built["decoder"], tmp / "b" / "decoder.onnx", dataset="second")
    before = _tree(out)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    args = ["--out", str(out), "--decoder", str(second), "--runtime"]
    proc = _vaepipe_site(*args, str(built["runtime"]), "--log-run", "0" * 32, cwd=tmp, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "0" * 32 in proc.stderr
    assert _tree(out) == before
