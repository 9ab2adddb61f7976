"""SIGINT/SIGTERM for the stages: one handler, two modes.

SIGTERM (`dvc queue kill`, a scheduler) is treated like Ctrl-C, so a stage stops the same way
for both: the MLflow run is closed KILLED and training saves where it stands. While `handled()`
is active, a signal raises KeyboardInterrupt at once. Inside `deferred()` (the training loop)
the first signal only sets a flag that the loop checks between optimizer steps, so an
interruption never lands inside optimizer.step() (a half-updated model cannot be resumed
exactly); a second signal interrupts at once. Inside `uninterrupted()` (a store call, the
publication of outputs) a signal waits for the end of the block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM inside `deferred()`: raised wherever the loop is."""


class _State:
    def __init__(self):
        self.depth = 0  # nested handled() blocks; the handler is installed by the outermost
        self.previous: dict = {}
        self.deferring = 0  # nested deferred() blocks
        self.requested: str | None = None  # the deferred signal's name


_state = _State()


def _handler(signum, frame):
    name = signal.Signals(signum).name
    if _state.deferring:
        if _state.requested:
            raise InterruptedAtOnce(name)
        _state.requested = name
        return
    raise KeyboardInterrupt(name)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt(<signal name>) inside this block."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install handlers; others keep Python's default
        return
    if _state.depth == 0:
        _state.previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0:
            for sig, previous in _state.previous.items():
                signal.signal(sig, previous)


class Deferred:
    """What `deferred()` yields: the signal asked for so far, checked between steps."""

    @property
    def requested(self) -> str | None:
        return _state.requested

    def check(self) -> None:
        if _state.requested:
            raise KeyboardInterrupt(_state.requested)


@contextlib.contextmanager
def deferred() -> Iterator[Deferred]:
    """Signals set a flag instead of raising (a second one raises InterruptedAtOnce)."""
    with handled():
        if _state.deferring == 0:
            _state.requested = None
        _state.deferring += 1
        try:
            yield Deferred()
        finally:
            _state.deferring -= 1
            if _state.deferring == 0:
                _state.requested = None


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Work a signal must not cut in two (a call to the MLflow store, whose database would stay
    locked by a half-done transaction; the publication of a stage's outputs): a SIGINT/SIGTERM
    arriving inside waits until the block ends and then raises as it would have; a second one
    raises at once. Inside `deferred()` the signal stays deferred to the training loop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with handled():
        nested = _state.deferring > 0
        _state.deferring += 1
        try:
            yield
        finally:
            _state.deferring -= 1
            pending = _state.requested
            if not nested:
                _state.requested = None
        if pending and not nested:
            raise KeyboardInterrupt(pending)


_STARTING: dict = {}  # the handlers exit_while_starting() replaced, until started()


def _exit_at_once(signum, frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


def exit_while_starting() -> None:
    """Until `started()`, a SIGINT/SIGTERM ends the process at once: a stage that is still
    importing has written nothing. Python's own KeyboardInterrupt is not enough there: raised
    inside an import, it can be swallowed by a library that catches everything around an
    optional import (numpy imported under torch is one), and the stage would then run to the
    end as if nobody had asked it to stop. A signal the process inherited as ignored stays so."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if previous is not signal.SIG_IGN:
            _STARTING[sig] = previous
            signal.signal(sig, _exit_at_once)


def started() -> None:
    """The process's own handlers again (KeyboardInterrupt on SIGINT), where
    exit_while_starting() replaced them."""
    if threading.current_thread() is not threading.main_thread():
        return
    while _STARTING:
        sig, previous = _STARTING.popitem()
        signal.signal(sig, previous)


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (None when it is gone or there is no /proc to ask)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)", which may hold spaces


def stop_with_parent(chain: Sequence[int], every: float = 0.5) -> None:
    """Stop this process (SIGTERM to itself, which stops a stage as Ctrl-C does: its MLflow
    run closed KILLED, nothing published) once the process that started it is gone: at once
    if it already is, else when a daemon thread sees it go.

    `chain` is this process's parent, then that parent's own parent and so on, as they were
    when the stage started: DVC runs a stage through `$SHELL -c`, and a shell that does not
    replace itself with the command (dash, /bin/sh on Debian) outlives a killed DVC, so the
    stage then watches DVC above the shell. Any link of the chain broken means orphaned."""
    chain = list(chain)

    def orphaned() -> bool:
        if os.getppid() != chain[0]:
            return True
        return any(parent_of(a) != b for a, b in zip(chain, chain[1:], strict=False))

    def watch() -> None:
        while not orphaned():
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    if orphaned():
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="vaepipe-parent-watch", daemon=True).start()
