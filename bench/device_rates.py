"""The GPU's measured peak rates, for the floors the benchmarks compare against.

A kernel's floor is the larger of its FLOPs over the dense matmul rate and its bytes over
the memory bandwidth; both are measured here on the device in use (not the data sheet's),
once per run:

- :func:`matmul_rate`: FLOP/s of an 8192^3 matmul in the given dtype.
- :func:`copy_bandwidth`: bytes/s of a 1 GiB device-to-device copy (bytes read + written).

Both return NaN without CUDA.
"""

from __future__ import annotations

import functools
import statistics
from typing import Callable

import torch


def _median_seconds(function: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median of ``repeats`` CUDA-event timings of ``function`` after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@functools.cache
def matmul_rate(dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul FLOP/s in ``dtype`` (8192^3, median of 20; once per process
    and dtype: device time is scarce); NaN without CUDA."""
    if not torch.cuda.is_available():
        return float("nan")
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    seconds = _median_seconds(lambda: a @ b, warmup=5, repeats=20)
    return 2 * size**3 / seconds


@functools.cache
def copy_bandwidth() -> float:
    """Measured memory bandwidth in bytes/s: a 1 GiB device-to-device copy counts 2 GiB
    (read and written), median of 20 (once per process); NaN without CUDA."""
    if not torch.cuda.is_available():
        return float("nan")
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    destination = torch.empty_like(source)
    seconds = _median_seconds(lambda: destination.copy_(source), warmup=3, repeats=20)
    return 2 * source.numel() / seconds
