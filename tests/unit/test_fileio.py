"""fileio.published: a stage's outputs appear together or not at all, with no temp file inside
any of them, whatever stops the stage."""

import json
import os
import signal
import subprocess
import sys

import pytest

from vaepipe.fileio import STAGING, published


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the outputs of an earlier run: a file and a folder of files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "m.json").write_text('{"old": 1}')
    (tmp_path / "plots" / "p").mkdir(parents=True)
    (tmp_path / "plots" / "p" / "a.png").write_text("old a")
    (tmp_path / "plots" / "p" / "gone.png").write_text("old, not drawn again")
    return tmp_path


def snapshot(root):
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and STAGING.name not in p.parts
    }


def write_both(out):
    (out("plots/p") / "a.png").write_text("new a")
    out("metrics/m.json").write_text(json.dumps({"new": 2}))


def test_outputs_are_replaced_together(project):
    with published("metrics/m.json", "plots/p") as out:
        write_both(out)
        assert json.loads((project / "metrics" / "m.json").read_text()) == {"old": 1}  # not yet
    assert snapshot(project) == {"metrics/m.json": '{"new": 2}', "plots/p/a.png": "new a"}
    assert not (project / STAGING).exists()


def test_an_error_or_an_interrupt_publishes_nothing(project):
    before = snapshot(project)
    for stop in (RuntimeError("a bug"), KeyboardInterrupt("SIGINT")):
        with pytest.raises(type(stop)), published("metrics/m.json", "plots/p") as out:
            write_both(out)
            raise stop
        assert snapshot(project) == before
        assert not (project / STAGING).exists()


def test_an_output_not_written_stays_and_a_stranger_is_refused(project):
    with published("metrics/m.json", "plots/p") as out:
        out("metrics/m.json").write_text("{}")
        with pytest.raises(ValueError, match="holds none of the outputs"):
            out("models/other.pt")
    assert (project / "plots" / "p" / "gone.png").exists()
    assert (project / "metrics" / "m.json").read_text() == "{}"


KILLED = """
import os, sys
sys.path.insert(0, {src!r})
from vaepipe.fileio import published
with published("metrics/m.json", "plots/p") as out:
    out("metrics/m.json").write_text("half")
    os.kill(os.getpid(), 9)
"""


def test_a_killed_stage_leaves_the_old_outputs_and_its_staging_goes_next_time(project):
    before = snapshot(project)
    src = str(__import__("vaepipe").__path__[0].rsplit("/", 1)[0])
    proc = subprocess.run([sys.executable, "-c", KILLED.format(src=src)], cwd=project)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(project) == before
    assert len(list((project / STAGING).iterdir())) == 1  # what SIGKILL left
    with published("metrics/m.json") as out:
        out("metrics/m.json").write_text("next")
    assert not (project / STAGING).exists()  # the dead process's staging went too
    assert os.listdir(project / "metrics") == ["m.json"]
