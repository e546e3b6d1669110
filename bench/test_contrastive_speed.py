"""pytest-benchmark benchmarks of ``blipfast.ops.contrastive_loss`` against the
materialized PyTorch loss and the matmuls-only floor.

Run on a GPU machine with::

    pytest bench/test_contrastive_speed.py --benchmark-only

Each test covers one (case, implementation) combination from
``contrastive_benchmark_cases``: blipfast is first checked against the fp32 materialized
loss at a small N, then every implementation runs once to warm up, once to measure its
peak memory, and is timed with ``triton.testing.do_bench``. pytest-benchmark owns the
timing call through ``benchmark.pedantic`` with a single round; the number that matters
is do_bench's median, stored in ``benchmark.extra_info`` and in the session's results
table (``bench/results/contrastive-<device>-<date>.md`` and ``.jsonl``).

An implementation that runs out of memory (the materialized loss at the largest N) or
whose op is not importable is recorded and skipped; an incorrect result fails the test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

BENCH_DIRECTORY = Path(__file__).resolve().parent
if str(BENCH_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(BENCH_DIRECTORY))

import pytest  # noqa: E402

import contrastive_benchmark_cases  # noqa: E402
from contrastive_benchmark_cases import ContrastiveCase, MeasurementRecord  # noqa: E402

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture


@pytest.mark.parametrize("implementation_name", contrastive_benchmark_cases.IMPLEMENTATION_NAMES)
@pytest.mark.parametrize("case", contrastive_benchmark_cases.CASES, ids=lambda case: case.name)
def test_contrastive(
    benchmark: BenchmarkFixture,
    record_contrastive_measurement: Callable[[MeasurementRecord], None],
    case: ContrastiveCase,
    implementation_name: str,
) -> None:
    """Check (blipfast), measure memory and time one implementation on one case."""
    benchmark.group = f"contrastive-{case.name}"
    record = contrastive_benchmark_cases.measure(
        implementation_name,
        case,
        timer=lambda timing: benchmark.pedantic(timing, rounds=1, iterations=1),
    )
    benchmark.extra_info.update(record.to_dict())
    record_contrastive_measurement(record)
    if record.status == "incorrect":
        pytest.fail(record.reason or "incorrect result", pytrace=False)
    if record.status != "ok":
        pytest.skip(f"{record.status}: {record.reason}")
