"""Atomic file writes: a stage interrupted mid-write leaves the old file or none, never a part;
and `published`, through which a stage's outputs appear together or not at all.

Every file the pipeline and the CLI write goes through `atomic_path`, which also gives the new
file the mode any other tool would (0666 minus the umask: 0644 under umask 022). The temp file
of tempfile.mkstemp is 0600 whatever the umask, which would leave outputs unreadable to a
teammate, a web server or a container user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vaepipe.errors import VaepipeError


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (single-threaded stages)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed over `path` (same filesystem)
    with mode 0666 & ~umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_path(path: str | Path) -> Iterator[Path]:
    """atomic_path for a file the user named (--out, --plot): a write that fails (no such
    folder, a folder of that name, no permission, a full disk) is one error naming the path,
    and leaves no temp file."""
    path = Path(path)
    if path.is_dir():
        raise VaepipeError(f"cannot write {path}: it is a folder; name a file in it")
    if path.exists() and not path.is_file():  # a device, a pipe: a rename would replace it
        raise VaepipeError(f"cannot write {path}: it is not a regular file")
    existing = next((d for d in path.parents if d.exists()), None)  # the folders are made
    if existing is not None and not existing.is_dir():
        raise VaepipeError(f"cannot write {path}: {existing} is not a folder")
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as e:
        raise VaepipeError(f"cannot write {path}: {e.strerror or e}") from None


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# Where a stage writes its outputs before publishing them: beside the project's outputs (same
# filesystem, so publishing is a rename), inside none of them. Ignored by git.
STAGING = Path(".vaepipe-staging")


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale_staging() -> None:
    """Staging folders of processes that are gone (a stage killed by SIGKILL)."""
    for d in STAGING.glob("*"):
        pid = d.name.rpartition("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _publish(staged: dict[Path, Path], trash: Path) -> list[Path]:
    """Move each staged output over its published one (a file: one rename; a folder: the old
    one moved aside, then the new one in); the outputs published."""
    done = []
    for out, new in staged.items():
        if not new.exists() and not new.is_symlink():
            continue  # not written by this run: the published one stays
        out.parent.mkdir(parents=True, exist_ok=True)
        if new.is_dir() and not new.is_symlink() and out.exists():
            trash.mkdir(parents=True, exist_ok=True)
            os.replace(out, trash / f"{len(done)}-{out.name}")
        os.replace(new, out)
        done.append(out)
    return done


@contextlib.contextmanager
def published(*outputs: str | Path) -> Iterator[Callable[[str | Path], Path]]:
    """Write a stage's `outputs` (files or folders) through the function this yields, which
    maps each output to its place in a staging folder; when the block ends without an error,
    all of them replace the published ones together, with SIGINT/SIGTERM held until the last
    is in place. On an error or an interrupt nothing is published and the staging folder goes.
    An output the block did not write stays as it was."""
    from vaepipe import signals

    STAGING.mkdir(exist_ok=True)
    _clear_stale_staging()
    root = Path(tempfile.mkdtemp(prefix="stage-", suffix=f"-{os.getpid()}", dir=STAGING))
    staged = {Path(o): root / "out" / Path(o) for o in outputs}

    def place(path: str | Path) -> Path:
        """Where to write output `path` (or a folder holding outputs: files written there that
        are not outputs are dropped)."""
        path = Path(path)
        if not any(o == path or path in o.parents for o in staged):
            raise ValueError(f"{path} holds none of the outputs {sorted(map(str, staged))}")
        where = root / "out" / path
        folder = path not in staged or path.is_dir()  # a folder of outputs, or a folder output
        (where if folder else where.parent).mkdir(parents=True, exist_ok=True)
        return where

    try:
        yield place
        with signals.uninterrupted():
            _publish(staged, root / "replaced")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            STAGING.rmdir()  # when no other stage is staging
