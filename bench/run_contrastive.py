"""Run the contrastive (ITC) loss benchmarks without pytest and print the results table.

Usage (on a GPU machine)::

    python bench/run_contrastive.py                        # every case and implementation
    python bench/run_contrastive.py --out /tmp/results     # write the .md/.jsonl elsewhere
    python bench/run_contrastive.py --cases itc_n32768 --implementations blipfast matmuls_only

On a CPU-only machine, ``--cpu-smoke`` exercises the harness itself: every
implementation on two float32 cases at N=64 (Q=1 and Q=4) through the same
measurement code, blipfast's correctness check against the fp32 materialized loss, and
a check that the correctness check rejects a wrong loss. Smoke results are written only
when ``--out`` is given.

Results are merged into the day's files for the device (a rerun replaces the
measurements it repeats and keeps the others). Ctrl-C stops measuring: the summary of
what finished is printed and written, and the exit status is 130.

The measurements (cases, inputs, implementations, correctness check, timing, memory)
come from ``contrastive_benchmark_cases``, the same module the pytest benchmarks use.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIRECTORY = Path(__file__).resolve().parent
if str(BENCH_DIRECTORY) not in sys.path:
    sys.path.insert(0, str(BENCH_DIRECTORY))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import contrastive_benchmark_cases as cases  # noqa: E402
from command_line import seed, writable_directory  # noqa: E402
from result_files import INTERRUPTED_EXIT_STATUS, stop_on_interrupt  # noqa: E402
from contrastive_benchmark_cases import (  # noqa: E402
    ContrastiveCase,
    MeasurementRecord,
    RunSettings,
)

SMOKE_CASES: tuple[ContrastiveCase, ...] = (
    ContrastiveCase("smoke_n64", 64),
    ContrastiveCase("smoke_q4_n64", 64, queries=4),
)
SMOKE_DTYPE = torch.float32


def parse_arguments(arguments: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=writable_directory,
        default=None,
        help="directory for the .md and .jsonl results (default: bench/results; "
        "with --cpu-smoke nothing is written unless given)",
    )
    for flag, names, what in (
        ("--cases", cases.CASES_BY_NAME, "cases to run (ignored with --cpu-smoke)"),
        ("--implementations", cases.IMPLEMENTATION_NAMES, "implementations to run"),
    ):
        parser.add_argument(
            flag, nargs="+", choices=list(names), default=list(names), help=f"{what}; default: all"
        )
    parser.add_argument("--seed", type=seed, default=cases.DEFAULT_SEED, help="input seed")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="exercise the harness on CPU in float32 at N=64 (no GPU needed)",
    )
    return parser.parse_args(arguments)


def describe(record: MeasurementRecord) -> str:
    """One progress line for a finished measurement."""
    label = f"{record.case:<16} {record.implementation:<13}"
    if record.status != "ok" or record.milliseconds is None:
        return f"{label} {record.status}: {record.reason}"
    memory = record.peak_extra_mebibytes
    memory_text = "" if memory is None else f" {memory:10.1f} MiB"
    throughput = record.teraflops_per_second or 0.0
    return f"{label} {record.milliseconds:10.3f} ms{memory_text} {throughput:8.1f} TFLOP/s"


def run_cases(
    selected_cases: Sequence[ContrastiveCase],
    implementation_names: Sequence[str],
    settings: RunSettings,
    output_directory: Path | None = None,
) -> tuple[list[MeasurementRecord], bool]:
    """Measure every (case, implementation), printing a line as each finishes and, with
    ``output_directory``, rewriting the result files after each (an interrupted run keeps
    what it measured). Ctrl-C stops the measuring; returns the finished records and
    whether it was interrupted."""
    records: list[MeasurementRecord] = []
    environment = cases.collect_environment()
    with stop_on_interrupt() as interruption:
        for case in selected_cases:
            for implementation_name in implementation_names:
                record = cases.measure(implementation_name, case, settings)
                records.append(record)
                print(describe(record), flush=True)
                if output_directory is not None:
                    cases.write_results(records, output_directory, environment)
    return records, interruption.interrupted


def finish(
    records: Sequence[MeasurementRecord],
    output_directory: Path | None,
    problems: Sequence[str] = (),
    interrupted: bool = False,
) -> int:
    """Write the result files (if ``output_directory``), print the summary with the table
    last, and return the exit status: 130 if ``interrupted`` (Ctrl-C), else 1 if a result
    is incorrect, an implementation raised, or ``problems`` is not empty."""
    environment = cases.collect_environment()
    if output_directory is not None and records:
        markdown_path, jsonl_path = cases.write_results(records, output_directory, environment)
        print(f"\nResults written to {markdown_path} and {jsonl_path}")
    elif output_directory is not None:
        print(f"\nNo measurement finished; nothing written to {output_directory}")
    failed = [record for record in records if record.status in ("incorrect", "error")]
    for line in [*problems, *(f"{r.implementation} on {r.case}: {r.reason}" for r in failed)]:
        print(f"FAILED: {line}", file=sys.stderr)
    print()
    partial = " (interrupted: partial)" if interrupted else ""
    print(f"Contrastive loss benchmark{partial}: " + cases.environment_header(environment))
    print()
    print("\n".join(f"- {line}" for line in cases.target_lines(records)))
    print()
    print(cases.format_markdown_table(records), flush=True)
    if interrupted:
        return INTERRUPTED_EXIT_STATUS
    return 1 if failed or problems else 0


def _image_to_text_only_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """A wrong loss (the text-to-image term is missing) that the check must reject."""
    logits = logit_scale * (image_feat @ text_feat.t())
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def check_the_check(case: ContrastiveCase, settings: RunSettings) -> list[str]:
    """Run the correctness check on the materialized loss (must pass) and on a wrong loss
    (must be rejected); return the problems found."""
    problems = []
    reference = cases.IMPLEMENTATIONS[cases.REFERENCE_IMPLEMENTATION]
    try:
        cases.check_correctness(reference, case, settings)
        print(f"check: materialized matches the fp32 reference on {case.name}")
    except cases.IncorrectResultError as error:
        problems.append(f"the check rejected the reference itself: {error}")
    wrong = cases.Implementation(
        "image_to_text_only", cases.loss_step_builder(_image_to_text_only_loss)
    )
    try:
        cases.check_correctness(wrong, case, settings)
        problems.append("the check accepted a loss without its text-to-image term")
    except cases.IncorrectResultError as error:
        print(f"check: a wrong loss is rejected ({error})")
    return problems


def run_cpu_smoke(options: argparse.Namespace) -> int:
    """The ``--cpu-smoke`` run: the harness on CPU in float32 at N=64."""
    # blipfast's Triton kernels run on CPU tensors through the interpreter when it is
    # enabled before triton is first imported (nothing has imported it yet).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print(f"CPU smoke run (float32, TRITON_INTERPRET={os.environ['TRITON_INTERPRET']})", flush=True)
    if os.environ["TRITON_INTERPRET"] in ("", "0"):
        print("The interpreter is off: blipfast's rows time its PyTorch reference fallback, "
              "not the Triton kernels.", flush=True)
    settings = RunSettings(device="cpu", dtype=SMOKE_DTYPE, seed=options.seed)
    records, interrupted = run_cases(SMOKE_CASES, options.implementations, settings, options.out)
    problems: list[str] = []
    if not interrupted:
        with stop_on_interrupt("checking the check") as interruption:
            problems = check_the_check(SMOKE_CASES[0], settings)
        interrupted = interruption.interrupted
    return finish(records, options.out, problems, interrupted)


def main(arguments: Sequence[str] | None = None) -> int:
    """Run the selected measurements, write the result files and print the table."""
    options = parse_arguments(arguments)
    if options.cpu_smoke:
        return run_cpu_smoke(options)
    if not torch.cuda.is_available():
        print(
            "CUDA is not available; the contrastive benchmarks need a GPU "
            "(--cpu-smoke exercises the harness on CPU).",
            file=sys.stderr,
        )
        return 1
    print(cases.environment_header(cases.collect_environment()), flush=True)
    output_directory = options.out or BENCH_DIRECTORY / "results"
    records, interrupted = run_cases(
        [cases.CASES_BY_NAME[name] for name in options.cases],
        options.implementations,
        RunSettings(seed=options.seed),
        output_directory,
    )
    return finish(records, output_directory, interrupted=interrupted)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before measuring started: nothing to summarize
        print("\nInterrupted (Ctrl-C) before any measurement.", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_STATUS)
