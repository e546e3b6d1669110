"""Run the attention benchmarks without pytest and print the results table.

Usage (on a GPU machine)::

    python bench/run_attention.py                      # all shapes, modes, implementations
    python bench/run_attention.py --out /tmp/results   # write the .md/.jsonl elsewhere
    python bench/run_attention.py --case vit_g_self --mode fwd --implementation blipfast sdpa_flash

The measurements (shapes, inputs, implementations, correctness check, timing)
come from ``attention_benchmark_cases``, the same module the pytest benchmarks use.
Results are merged into the day's files for the device (a rerun replaces the
measurements it repeats and keeps the others). Ctrl-C stops measuring: the table of what
finished is printed and written, and the exit status is 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIRECTORY = Path(__file__).resolve().parent
if str(BENCH_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(BENCH_DIRECTORY))

import torch  # noqa: E402

import attention_benchmark_cases  # noqa: E402
from command_line import seed, writable_directory  # noqa: E402
from result_files import INTERRUPTED_EXIT_STATUS, stop_on_interrupt  # noqa: E402


def parse_arguments(arguments: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=writable_directory,
        default=BENCH_DIRECTORY / "results",
        help="directory for the .md and .jsonl results (default: bench/results)",
    )
    parser.add_argument(
        "--case",
        nargs="+",
        choices=list(attention_benchmark_cases.CASES_BY_NAME),
        default=list(attention_benchmark_cases.CASES_BY_NAME),
        help="shapes to run (default: all)",
    )
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=list(attention_benchmark_cases.MODES),
        default=list(attention_benchmark_cases.MODES),
        help="modes to run (default: all)",
    )
    parser.add_argument(
        "--implementation",
        nargs="+",
        choices=list(attention_benchmark_cases.IMPLEMENTATION_NAMES),
        default=list(attention_benchmark_cases.IMPLEMENTATION_NAMES),
        help="implementations to run (default: all)",
    )
    parser.add_argument(
        "--seed", type=seed, default=attention_benchmark_cases.DEFAULT_SEED, help="input seed"
    )
    return parser.parse_args(arguments)


def describe(record: attention_benchmark_cases.MeasurementRecord) -> str:
    """One progress line for a finished measurement."""
    label = f"{record.case:<20} {record.mode:<8} {record.implementation:<15}"
    if record.status == "ok" and record.milliseconds is not None:
        throughput = record.teraflops_per_second or 0.0
        return f"{label} {record.milliseconds:9.4f} ms {throughput:8.1f} TFLOP/s"
    return f"{label} {record.status}: {record.reason}"


def main(arguments: Sequence[str] | None = None) -> int:
    """Run the selected measurements, print the table and write the result files."""
    options = parse_arguments(arguments)
    if not torch.cuda.is_available():
        print("CUDA is not available; the attention benchmarks need a GPU.", file=sys.stderr)
        return 1

    environment = attention_benchmark_cases.collect_environment()
    print(attention_benchmark_cases.environment_header(environment), flush=True)

    records: list[attention_benchmark_cases.MeasurementRecord] = []
    with stop_on_interrupt() as interruption:
        for case_name in options.case:
            case = attention_benchmark_cases.CASES_BY_NAME[case_name]
            for mode in options.mode:
                for implementation_name in options.implementation:
                    record = attention_benchmark_cases.measure(
                        implementation_name, case, mode, seed=options.seed
                    )
                    records.append(record)
                    print(describe(record), flush=True)
                    # Rewritten after every measurement: an interrupted run keeps what it
                    # measured.
                    attention_benchmark_cases.write_results(records, options.out, environment)

    print()
    if interruption.interrupted:
        print("Attention benchmark (interrupted: partial)")
    print(attention_benchmark_cases.format_markdown_table(records, environment))
    if records:
        # Once more: a Ctrl-C during the last rewrite left the file without the last record.
        markdown_path, jsonl_path = attention_benchmark_cases.write_results(
            records, options.out, environment)
        print(f"\nResults written to {markdown_path} and {jsonl_path}", flush=True)
    if interruption.interrupted:
        return INTERRUPTED_EXIT_STATUS
    incorrect = [record for record in records if record.status == "incorrect"]
    return 1 if incorrect else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before measuring started: nothing to summarize
        print("\nInterrupted (Ctrl-C) before any measurement.", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_STATUS)
