"""Imported first by every stage script: make sure the stage runs with the project's packages,
and that it stops with the process that started it.

`.venv/bin/dvc repro` without an activated virtualenv runs `python` from PATH, the system
Python, which has none of them: a ModuleNotFoundError traceback. Here, before any other import,
the stage re-executes itself with the project's .venv/bin/python when that exists, or ends
with one line saying what to do. Standard library only until then.

Then the stage watches its parent (vaepipe.signals.stop_with_parent): `dvc repro` killed by
SIGTERM exits without stopping its stage. The parent is read here, before the slow imports, so
a stage orphaned while it starts stops too; when the parent is the `$SHELL -c` DVC runs the
command through and that shell stayed (dash does), DVC above it is watched as well. Until the
stage's main() begins, a SIGINT/SIGTERM ends it at once (vaepipe.signals.exit_while_starting).
"""

import importlib.util
import os
import sys
from pathlib import Path

NEEDED = ("vaepipe", "numpy", "yaml", "torch", "mlflow")
VENV_PYTHON = Path(".venv") / "bin" / "python"
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}


def _watched() -> list[int]:
    """The parent, and the parent's parent when the parent is a `-c` shell (Linux /proc)."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{parent}/stat").read_text()
    except OSError:
        return [parent]
    if (
        "-c" in (a.decode(errors="replace") for a in argv[1:])
        and Path(argv[0].decode(errors="replace")).name in SHELLS
    ):
        return [parent, int(stat.rsplit(")", 1)[1].split()[1])]
    return [parent]


# the processes that started the stage, carried across the re-exec below (and to no child)
_carried = os.environ.pop("VAEPIPE_STAGE_PARENT", "")
WATCHED = [int(p) for p in _carried.split(",")] if _carried else _watched()


def _missing() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def ensure() -> None:
    missing = _missing()
    if not missing:
        return
    # DVC_ROOT: a queued `dvc exp` runs in a temporary copy that has no .venv of its own
    root = Path(os.environ.get("DVC_ROOT") or Path(__file__).resolve().parents[1])
    venv_python = root / VENV_PYTHON
    if venv_python.is_file() and not os.environ.get("VAEPIPE_VENV_REEXEC"):
        os.environ["VAEPIPE_VENV_REEXEC"] = "1"  # once: a broken venv must not loop
        os.environ["VAEPIPE_STAGE_PARENT"] = ",".join(map(str, WATCHED))
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    where = f"{venv_python} lacks them too" if venv_python.is_file() else "there is no .venv"
    sys.stderr.write(
        f"error: {sys.executable} cannot import {', '.join(missing)} and {where}; run "
        "`make install`, then `source .venv/bin/activate` (or call .venv/bin/dvc)\n"
    )
    sys.exit(2)


ensure()

from vaepipe import signals  # noqa: E402  (once the packages are there)

signals.exit_while_starting()  # the stage's slow imports follow: a signal there ends it
signals.stop_with_parent(WATCHED)
