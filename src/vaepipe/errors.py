"""User-facing errors: each names what is wrong and where; the shell prints it, no traceback."""

from __future__ import annotations

import functools
import re
import sys

# scheme://user:password@host: the password in a tracking URI, a database URI or a remote
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")


def redact(text: str) -> str:
    """`text` with every URI password replaced by ***: messages, tags and logs hold no secret."""
    return _USERINFO.sub(r"\1:***@", text)


def first_line(e: BaseException) -> str:
    """An exception's first line, password-free (a driver's message may go on for lines)."""
    return redact((str(e).strip().splitlines() or [type(e).__name__])[0])


class VaepipeError(Exception):
    """An error caused by the user's input (params, files, payloads), not by a bug. Its message
    never holds a URI's password (it is shown, and recorded in a run's error tag)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(redact(str(message)))


class ConfigError(VaepipeError):
    pass


class DataError(VaepipeError):
    pass


class ModelFileError(VaepipeError):
    pass


class RuntimeProviderError(VaepipeError):
    pass


def exit_on_user_error(fn):
    """Run a stage/CLI entry point; a VaepipeError becomes `error: ...` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vaepipe import signals

        signals.started()  # a stage's imports are done: Ctrl-C is a KeyboardInterrupt again
        try:
            return fn(*args, **kwargs)
        except VaepipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
