"""SIGINT/SIGTERM: one handler for the stages (vaepipe.signals), two modes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaepipe import signals


def test_handled_turns_sigterm_into_keyboard_interrupt_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), signals.handled():
        with signals.handled():  # nested (a run inside a run): still one handler
            assert signal.getsignal(signal.SIGTERM) is signals._handler
        assert signal.getsignal(signal.SIGTERM) is signals._handler
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_flags_the_first_signal_and_raises_on_the_second():
    with signals.handled(), signals.deferred() as interrupts:
        assert interrupts.requested is None
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.requested == "SIGINT"  # nothing raised: the step finishes
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            interrupts.check()
        with pytest.raises(signals.InterruptedAtOnce, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    # a fresh block starts with no request, and outside one a signal raises at once again
    with signals.deferred() as interrupts:
        assert interrupts.requested is None
    with pytest.raises(KeyboardInterrupt), signals.handled():
        os.kill(os.getpid(), signal.SIGINT)


def test_uninterrupted_holds_a_signal_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), signals.uninterrupted():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("the rest of the block")  # still runs
    assert done == ["the rest of the block"]
    with pytest.raises(signals.InterruptedAtOnce), signals.uninterrupted():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a second one: at once
        done.append("not reached")
    assert done == ["the rest of the block"]
    with signals.uninterrupted():
        pass  # nothing pending: nothing raised


# A stage (the grandchild) whose parent (the launcher) exits: with the launcher's pid given,
# it stops whether the launcher is gone before the watch begins or after.
STAGE = """
import sys, time
from vaepipe import signals
time.sleep(float(sys.argv[2]))
signals.stop_with_parent([int(sys.argv[1])])
time.sleep(60)
"""
LAUNCHER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(float(sys.argv[3]))
"""


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until `pid` has ended (gone, or a zombie not yet reaped by whoever adopted it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the orphaned stage kept running")


@pytest.mark.parametrize(("stage_waits", "parent_lives"), [(0.0, 1.5), (1.5, 0.0)])
def test_a_stage_stops_when_its_parent_is_gone(stage_waits, parent_lives):
    launcher = subprocess.run(
        [sys.executable, "-c", LAUNCHER, STAGE, str(stage_waits), str(parent_lives)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    wait_gone(int(launcher.stdout.split()[0]))


# DVC runs a stage as `$SHELL -c CMD`: bash replaces itself with the stage, dash stays between
# them. Either way, the launcher (DVC) gone, the stage stops: _venv watches above the shell.
PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"
SHELL_STAGE = f"""
import os, sys, time
sys.path.insert(0, {str(PIPELINE)!r})
open(sys.argv[1], "w").write(str(os.getpid()))
import _venv
time.sleep(60)
"""
SHELL_LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.argv[1], "-c", sys.argv[2]])
time.sleep(float(sys.argv[3]))
"""


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_stage_run_through_a_shell_stops_when_the_launcher_is_gone(shell, tmp_path):
    if not Path(shell).exists():
        pytest.skip(f"no {shell}")
    script, pid_file = tmp_path / "stage.py", tmp_path / "stage.pid"
    script.write_text(SHELL_STAGE)
    command = f"{sys.executable} {script} {pid_file}"
    subprocess.run(
        [sys.executable, "-c", SHELL_LAUNCHER, shell, command, "3"], timeout=60, check=True
    )
    wait_gone(int(pid_file.read_text()))


STARTING = """
import os, signal, sys
from vaepipe import signals
from vaepipe.errors import exit_on_user_error

signals.exit_while_starting()
try:  # a library's import that catches everything, as numpy's under torch does
    os.kill(os.getpid(), signal.SIG{name})
except BaseException:
    pass
print("ran on after the signal")

@exit_on_user_error
def main():
    print("main")
main()
"""

STARTED = """
import os, signal
from vaepipe import signals
from vaepipe.errors import exit_on_user_error

signals.exit_while_starting()

@exit_on_user_error
def main():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    print("main")
    os.kill(os.getpid(), signal.SIGINT)
    print("ran on after the signal")
main()
"""


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_a_signal_while_a_stage_imports_ends_it_even_where_a_library_swallows_it(name):
    """A stage still importing has written nothing: a signal ends it at once, with the status
    of an interrupted stage, even inside an `except BaseException` of a library."""
    proc = subprocess.run(
        [sys.executable, "-c", STARTING.format(name=name)], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 130, proc
    assert proc.stderr == "interrupted\n" and proc.stdout == "", proc


def test_once_the_stage_runs_sigint_is_a_keyboard_interrupt_again():
    proc = subprocess.run(
        [sys.executable, "-c", STARTED], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc
    assert proc.stdout == "main\n" and proc.stderr == "interrupted\n", proc


def test_a_signal_inherited_as_ignored_stays_ignored():
    proc = subprocess.run(
        [sys.executable, "-c", "import os, signal\nfrom vaepipe import signals\n"
         "signals.exit_while_starting()\nos.kill(os.getpid(), signal.SIGINT)\nprint('on')"],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "on\n", proc
