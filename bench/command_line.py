"""Argument types shared by the bench scripts' command lines."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, with a clear message
    ("not an integer: 'abc'", "must be at least 1, got 0") otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer_at_least_{minimum}"
    return parse


def writable_directory(text: str) -> Path:
    """An argparse ``type``: a results directory, made if missing (parents too) and
    checked writable by writing and removing a probe file, so that a bad ``--out`` stops
    the command before it measures anything rather than after."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"cannot write results in {text}: {error.strerror or error}") from None
    return path


def seed(text: str) -> int:
    """An argparse ``type``: a random seed, an integer in [0, 2**64 - 1] (what
    ``torch.manual_seed`` takes)."""
    value = integer_at_least(0)(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2**64, got {value}")
    return value
