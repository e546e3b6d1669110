"""pytest configuration for the GPU benchmarks in ``bench/``.

* Every benchmark is skipped (not errored) when CUDA is unavailable, so
  ``pytest bench/`` still collects cleanly on a CPU-only machine.
* Benchmarks hand their :class:`attention_benchmark_cases.MeasurementRecord` to the
  ``record_attention_measurement`` fixture. At the end of the session the
  records are written to ``bench/results/attention-<device>-<date>.md`` and
  ``.jsonl`` and the table is printed to the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

BENCH_DIRECTORY = Path(__file__).resolve().parent
RESULTS_DIRECTORY = BENCH_DIRECTORY / "results"
if str(BENCH_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(BENCH_DIRECTORY))

import pytest  # noqa: E402
import torch  # noqa: E402

import attention_benchmark_cases  # noqa: E402

ATTENTION_RECORDS_KEY = pytest.StashKey[list[attention_benchmark_cases.MeasurementRecord]]()


def pytest_configure(config: pytest.Config) -> None:
    """Create the session-wide list that collects measurement records."""
    config.stash[ATTENTION_RECORDS_KEY] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every benchmark under ``bench/`` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip_without_cuda = pytest.mark.skip(reason="CUDA is not available; the benchmarks need a GPU")
    for item in items:
        if item.path.is_relative_to(BENCH_DIRECTORY):
            item.add_marker(skip_without_cuda)


@pytest.fixture
def record_attention_measurement(
    request: pytest.FixtureRequest,
) -> Callable[[attention_benchmark_cases.MeasurementRecord], None]:
    """Return a function that adds a record to the session's results."""
    return request.config.stash[ATTENTION_RECORDS_KEY].append


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write and print the results table if any benchmark recorded a measurement."""
    config = session.config
    if hasattr(config, "workerinput"):  # a pytest-xdist worker; only the controller reports
        return
    records = config.stash.get(ATTENTION_RECORDS_KEY, [])
    if not records:
        return

    environment = attention_benchmark_cases.collect_environment()
    markdown_path, jsonl_path = attention_benchmark_cases.write_results(
        records, RESULTS_DIRECTORY, environment
    )
    lines = [
        "",
        "Attention benchmark: " + attention_benchmark_cases.environment_header(environment),
        attention_benchmark_cases.format_markdown_table(records),
        f"Results written to {markdown_path} and {jsonl_path}",
    ]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for line in "\n".join(lines).splitlines():
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)
