"""Result files that survive interruption.

Benchmarks rewrite their result files after every measurement with
:func:`write_atomically`, so a run killed part-way (a device call's time limit, Ctrl-C)
leaves complete files holding every measurement finished so far, never a half-written one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) in one step: write a temporary file beside it,
    flush it to disk, then rename it over ``path``. Readers see the old or the new
    content, never a mix. Returns ``path`` as a Path."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path
