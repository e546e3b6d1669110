"""pytest-benchmark benchmarks of ``blipfast.ops.attention`` against its peers.

Run on a GPU machine with::

    pytest bench/ --benchmark-only

Each test covers one (shape, mode, implementation) combination from
``attention_benchmark_cases``. The implementation is first run once and checked against
an fp32 reference, then timed with ``triton.testing.do_bench`` (CUDA events).
pytest-benchmark owns the test through ``benchmark.pedantic`` with a single
round, but the number that matters is do_bench's median, which is stored in
``benchmark.extra_info`` and in the session's results table.
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

import attention_benchmark_cases  # noqa: E402
from attention_benchmark_cases import AttentionCase, MeasurementRecord, Mode  # noqa: E402

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture


@pytest.mark.parametrize("implementation_name", attention_benchmark_cases.IMPLEMENTATION_NAMES)
@pytest.mark.parametrize("mode", attention_benchmark_cases.MODES)
@pytest.mark.parametrize("case", attention_benchmark_cases.CASES, ids=lambda case: case.name)
def test_attention(
    benchmark: BenchmarkFixture,
    record_attention_measurement: Callable[[MeasurementRecord], None],
    case: AttentionCase,
    mode: Mode,
    implementation_name: str,
) -> None:
    """Verify, then time one implementation on one shape in one mode."""
    benchmark.group = f"attention-{case.name}-{mode}"

    def record_failure(status: attention_benchmark_cases.Status, reason: str) -> None:
        record = MeasurementRecord.create(implementation_name, case, mode, status, reason=reason)
        benchmark.extra_info.update(record.to_dict())
        record_attention_measurement(record)

    try:
        prepared = attention_benchmark_cases.prepare_run(implementation_name, case, mode)
    except attention_benchmark_cases.NotApplicableError as error:
        record_failure("skipped", str(error))
        pytest.skip(str(error))
    except attention_benchmark_cases.UnsupportedImplementationError as error:
        record_failure("unsupported", str(error))
        pytest.skip(f"unsupported: {error}")
    except attention_benchmark_cases.IncorrectResultError as error:
        record_failure("incorrect", str(error))
        raise

    milliseconds = benchmark.pedantic(prepared.time_milliseconds, rounds=1, iterations=1)
    record = prepared.record(milliseconds)
    benchmark.extra_info.update(record.to_dict())
    record_attention_measurement(record)
