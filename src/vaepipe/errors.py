"""User-facing errors: each names what is wrong and where; the shell prints it, no traceback."""

from __future__ import annotations

import functools
import sys


class VaepipeError(Exception):
    """An error caused by the user's input (params, files, payloads), not by a bug."""


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
        try:
            return fn(*args, **kwargs)
        except VaepipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
