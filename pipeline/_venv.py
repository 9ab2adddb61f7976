"""Imported first by every stage script: make sure the stage runs with the project's packages.

`.venv/bin/dvc repro` without an activated virtualenv runs `python` from PATH, the system
Python, which has none of them: a ModuleNotFoundError traceback. Here, before any other import,
the stage re-executes itself with the project's .venv/bin/python when that exists, or ends
with one line saying what to do. Standard library only.
"""

import importlib.util
import os
import sys
from pathlib import Path

NEEDED = ("vaepipe", "numpy", "yaml", "torch", "mlflow")
VENV_PYTHON = Path(".venv") / "bin" / "python"


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
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    where = f"{venv_python} lacks them too" if venv_python.is_file() else "there is no .venv"
    sys.stderr.write(
        f"error: {sys.executable} cannot import {', '.join(missing)} and {where}; run "
        "`make install`, then `source .venv/bin/activate` (or call .venv/bin/dvc)\n"
    )
    sys.exit(2)


ensure()
