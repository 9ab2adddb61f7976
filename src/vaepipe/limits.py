"""Size guards: a request that cannot fit in memory ends with one line before any allocation.

A user asking `vaepipe generate --n 100000000` or decoding a 10-million-row file should hear at
once what the limit is, not watch the machine swap. The limit is half the memory available to
this process (MemAvailable, capped by a cgroup limit in a container), so two such jobs still fit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from vaepipe.errors import VaepipeError

MEMORY_FRACTION = 0.5
# Pillow refuses to open images above this many pixels (its decompression-bomb guard), and so
# do most viewers: a larger PNG grid would be written but unreadable.
MAX_PNG_PIXELS = 89_478_485


class SizeError(VaepipeError):
    pass


def _read_int(path: str, prefix: str = "", scale: int = 1) -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(prefix):
            field = line[len(prefix) :].split()
            if field and field[0].isdigit():
                return int(field[0]) * scale
    return None


def available_memory() -> int:
    """Bytes this process can still allocate, as far as the OS tells."""
    candidates = [
        _read_int("/proc/meminfo", "MemAvailable:", 1024),
        _read_int("/sys/fs/cgroup/memory.max"),  # cgroup v2; "max" (no limit) reads as None
    ]
    known = [c for c in candidates if c]
    if known:
        return min(known)
    try:  # macOS and other POSIX systems: physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63  # unknown: no guard rather than a wrong one


def memory_limit() -> int:
    return int(available_memory() * MEMORY_FRACTION)


def human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:,.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    raise AssertionError  # unreachable


def check_bytes(what: str, need: int, hint: str = "") -> None:
    """SizeError naming `what`, the bytes it needs and the limit."""
    limit = memory_limit()
    if need > limit:
        raise SizeError(
            f"{what} needs {human(need)} of memory; the limit here is {human(limit)} "
            "(half the memory available)" + (f"; {hint}" if hint else "")
        )


def check_rows(what: str, rows: int, bytes_per_row: int, hint: str = "") -> None:
    """SizeError naming `what` = rows, the bytes it needs and how many rows would fit."""
    limit = memory_limit()
    need = rows * bytes_per_row
    if need > limit:
        most = max(0, limit // max(1, bytes_per_row))
        raise SizeError(
            f"{what} = {rows:,} needs {human(need)} of memory; the limit here is "
            f"{human(limit)} (half the memory available), i.e. at most {most:,} rows"
            + (f"; {hint}" if hint else "")
        )


def check_png_grid(what: str, n: int, cols: int, image_hw: tuple[int, int], pad: int) -> None:
    """SizeError when a grid of n images would exceed what a PNG viewer opens."""
    h, w = image_hw
    rows = math.ceil(n / cols)
    pixels = (rows * (h + pad) + pad) * (cols * (w + pad) + pad)
    if pixels > MAX_PNG_PIXELS:
        raise SizeError(
            f"{what} = {n:,} images make a PNG grid of {pixels / 1e6:,.0f} megapixels, more than "
            f"the limit of {MAX_PNG_PIXELS / 1e6:.0f} megapixels (Pillow and most viewers refuse "
            "larger images); write an .npz instead, or fewer images"
        )
