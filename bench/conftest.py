"""pytest configuration for the GPU benchmarks in ``bench/``.

* Every benchmark is skipped (not errored) when CUDA is unavailable, so
  ``pytest bench/`` still collects cleanly on a CPU-only machine.
* Benchmarks hand their :class:`attention_benchmark_cases.MeasurementRecord` to the
  ``record_attention_measurement`` fixture, which rewrites
  ``bench/results/attention-<device>-<date>.md`` and ``.jsonl`` after every record (an
  interrupted session keeps what it measured); at the end of the session the table is
  printed to the terminal. The records are merged into the day's files: a session that
  runs a subset (``-k``) replaces the measurements it repeats and keeps the others.
* The contrastive loss benchmarks do the same with
  :class:`contrastive_benchmark_cases.MeasurementRecord`, the
  ``record_contrastive_measurement`` fixture and
  ``bench/results/contrastive-<device>-<date>.md`` / ``.jsonl``.
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
import contrastive_benchmark_cases  # noqa: E402

ATTENTION_RECORDS_KEY = pytest.StashKey[list[attention_benchmark_cases.MeasurementRecord]]()
CONTRASTIVE_RECORDS_KEY = pytest.StashKey[list[contrastive_benchmark_cases.MeasurementRecord]]()
ENVIRONMENT_KEY = pytest.StashKey[dict]()

RESULT_SINKS = (
    ("Attention benchmark", ATTENTION_RECORDS_KEY, attention_benchmark_cases),
    ("Contrastive loss benchmark", CONTRASTIVE_RECORDS_KEY, contrastive_benchmark_cases),
)
"""(title, stash key, module): each module provides ``collect_environment``,
``write_results``, ``environment_header`` and ``format_markdown_table``."""


def pytest_configure(config: pytest.Config) -> None:
    """Create the session-wide lists that collect measurement records."""
    for _, key, _ in RESULT_SINKS:
        config.stash[key] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every benchmark under ``bench/`` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip_without_cuda = pytest.mark.skip(reason="CUDA is not available; the benchmarks need a GPU")
    for item in items:
        if item.path.is_relative_to(BENCH_DIRECTORY):
            item.add_marker(skip_without_cuda)


def _environment(config: pytest.Config, module) -> dict:
    """The module's environment description, collected once per session."""
    environments = config.stash.setdefault(ENVIRONMENT_KEY, {})
    if module.__name__ not in environments:
        environments[module.__name__] = module.collect_environment()
    return environments[module.__name__]


def _recorder(request: pytest.FixtureRequest, key, module) -> Callable[[object], None]:
    """Append a record to the session's list and rewrite that module's result files, so
    a session killed part-way keeps every measurement finished so far. In a pytest-xdist
    worker (``-n``) the benchmark is skipped: processes timing at once on one GPU disturb
    each other's timings, and a worker's records never reached the results files."""
    config = request.config
    if hasattr(config, "workerinput"):
        pytest.skip("benchmarks run in one process: run pytest bench/ without -n")

    def record(measurement) -> None:
        records = config.stash[key]
        records.append(measurement)
        module.write_results(records, RESULTS_DIRECTORY, _environment(config, module))

    return record


@pytest.fixture
def record_attention_measurement(
    request: pytest.FixtureRequest,
) -> Callable[[attention_benchmark_cases.MeasurementRecord], None]:
    """Return a function that adds an attention record to the session's results (and
    rewrites the result files)."""
    return _recorder(request, ATTENTION_RECORDS_KEY, attention_benchmark_cases)


@pytest.fixture
def record_contrastive_measurement(
    request: pytest.FixtureRequest,
) -> Callable[[contrastive_benchmark_cases.MeasurementRecord], None]:
    """Return a function that adds a contrastive loss record to the session's results
    (and rewrites the result files)."""
    return _recorder(request, CONTRASTIVE_RECORDS_KEY, contrastive_benchmark_cases)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write and print each results table for which a benchmark recorded a measurement."""
    config = session.config
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (its benchmarks skip)
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for title, key, module in RESULT_SINKS:
        records = config.stash.get(key, [])
        if not records:
            continue
        environment = _environment(config, module)
        markdown_path, jsonl_path = module.write_results(records, RESULTS_DIRECTORY, environment)
        lines = [
            "",
            f"{title}: " + module.environment_header(environment),
            module.format_markdown_table(records),
            f"Results written to {markdown_path} and {jsonl_path}",
        ]
        for line in "\n".join(lines).splitlines():
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line)
