"""SIGINT/SIGTERM: one handler for the stages (vaepipe.signals), two modes."""

import os
import signal

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
