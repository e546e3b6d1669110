"""Sweep tile configurations of the attention kernels at the benchmark shapes (GPU).

A development tool: it times every candidate configuration of the forward and backward
launchers with ``triton.testing.do_bench`` and prints, per shape, the fastest ones. The
heuristics in ``kernels/attention.py`` (``_forward_config``, ``_backward_config``) are set
from its output.

    python bench/sweep_attention_configs.py [--out results.jsonl]

Compiling the ~100 candidates per shape takes longer than timing them. ``--compile-only
--part I/N`` runs part I of N of the candidates once each (compiling them into Triton's
on-disk cache) without timing: N such processes in parallel, then one timing run, which
then finds every kernel compiled (bench/gpu_session.sh sweep does this).

Ctrl-C stops the sweep: the ``best`` lines of the shape being swept are printed (marked
partial; finished shapes printed theirs already), ``--out`` keeps every timed candidate,
and the exit status is 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from attention_benchmark_cases import CASES, CASES_BY_NAME, collect_environment  # noqa: E402
from result_files import (  # noqa: E402
    INTERRUPTED_EXIT_STATUS, stop_on_interrupt, write_merged_jsonl)

FORWARD_CANDIDATES = [
    (block_m, block_n, warps, stages)
    for block_m, block_n, warps in [(32, 64, 4), (64, 32, 4), (64, 64, 4), (64, 128, 4),
                                    (64, 128, 8), (128, 32, 4), (128, 64, 4), (128, 64, 8),
                                    (128, 128, 8)]
    for stages in (1, 2, 3)
]
BACKWARD_CANDIDATES = [
    (block_m, block_n, warps, stages)
    for block_m, block_n, warps in [(16, 64, 4), (32, 32, 4), (32, 64, 4), (32, 128, 4),
                                    (64, 64, 4), (64, 64, 8), (64, 128, 8), (128, 64, 8)]
    for stages in (1, 2)
]

SEQUENCE_TAIL = 16  # the tail tile length tried on each sequence axis


def _tail_options(case, block_m: int, block_n: int) -> list[tuple[int, int]]:
    """(BLOCK_M_TAIL, BLOCK_N_TAIL) pairs to try with these tiles. An axis gets a 16-long
    tail, or none, when its length is not a multiple of its tile (577 = 9 * 64 + 1: a
    16-long tile for the last key instead of a 64-long one) and the tile is longer than
    the tail; the two axes independently, so that short text (35 = 32 + 16 queries) can
    take a query tail while its 35 keys stay one key tile (the one-launch backward)."""
    def options(length: int, block: int) -> tuple[int, ...]:
        return (0, SEQUENCE_TAIL) if length % block and block > SEQUENCE_TAIL else (0,)
    return [(tail_m, tail_n) for tail_m in options(case.query_length, block_m)
            for tail_n in options(case.key_length, block_n)]


@dataclasses.dataclass
class Candidate:
    """One configuration of one launcher to time on a shape."""

    mode: str
    """``fwd`` or ``bwd``."""
    variant: str
    """What the best is kept per: the mode, the split head dim and each axis's tail."""
    config: dict
    run: Callable[[], object]
    """One launch with ``config``."""


def gpu_candidates(case) -> Iterator[Candidate]:
    """Every forward and backward candidate on ``case``, on the GPU (inputs are made, and
    the forward run once for the backward's inputs, when the first one is asked for)."""
    from attention_benchmark_cases import make_inputs
    from blipfast.kernels import attention as kernel

    inputs = make_inputs(case, requires_grad=False)
    q, k, v, mask = inputs.query, inputs.key, inputs.value, inputs.key_padding_mask
    grad_out = inputs.output_gradient
    scale = case.head_dim ** -0.5
    out, log_sum_exp = kernel.attention_forward(q, k, v, mask, None, case.causal, scale)
    # The forward may split a non-power-of-2 head dim (88: 64 + 32) instead of padding.
    splits = (False, True) if kernel._forward_head_dim_blocks(case.head_dim, True)[1] \
        else (False,)
    for mode, candidates in (("fwd", FORWARD_CANDIDATES), ("bwd", BACKWARD_CANDIDATES)):
        for (block_m, block_n, warps, stages), split, (tail_m, tail_n) in (
                (candidate, split, tails) for candidate in candidates
                for split in (splits if mode == "fwd" else (False,))
                for tails in _tail_options(case, *candidate[:2])):
            config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                          num_stages=stages, BLOCK_M_TAIL=tail_m, BLOCK_N_TAIL=tail_n)
            if mode == "fwd":
                config["SPLIT_HEAD_DIM"] = split

                def run(config=config):
                    kernel.attention_forward(q, k, v, mask, None, case.causal, scale,
                                             config=config)
            else:
                def run(config=config):
                    kernel.attention_backward(grad_out, q, k, v, out, log_sum_exp, mask,
                                              None, case.causal, scale, config=config)
            # The best of each head-dim layout, with and without each axis's tail.
            variant = mode + (" split" if split else "") + (" query tail" if tail_m else "") \
                + (" key tail" if tail_n else "")
            yield Candidate(mode, variant, config, run)


def gpu_milliseconds(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run`` by ``triton.testing.do_bench``."""
    import triton

    return triton.testing.do_bench(run, warmup=10, rep=40)


def best_lines(case_name: str, best: dict[str, tuple[float, dict]], note: str = "") -> list[str]:
    """One ``best`` line per variant (``bench/gpu_session.sh`` greps them); ``note`` is
    appended (e.g. that the shape's sweep was interrupted)."""
    return [f"{case_name:24s} {variant:15s} best {milliseconds:.4f} ms {config}{note}"
            for variant, (milliseconds, config) in best.items()]


def run_sweep(
    selected_cases: Sequence,
    candidates_for: Callable[[object], Iterable[Candidate]],
    time_milliseconds: Callable[[Callable[[], object]], float],
    out: Path | None = None,
    compile_only: bool = False,
    part: tuple[int, int] = (1, 1),
) -> int:
    """Time (or, with ``compile_only``, run once: part I of N, every N-th candidate from
    the I-th) every candidate of every case and print each case's best lines; with
    ``out``, merge the timings into that .jsonl after every candidate (an environment line
    with the device and versions first; a candidate timed again replaces its earlier line,
    others are kept). Ctrl-C stops it: the best lines of the shape being swept are printed,
    marked partial, and 130 is returned."""
    index, parts = part
    environment = collect_environment() if out is not None and not compile_only else None
    candidate_index = compiled = 0
    records: list[dict] = []
    best: dict[str, tuple[float, dict]] = {}
    current_case = None
    with stop_on_interrupt("sweeping") as interruption:
        for case in selected_cases:
            current_case, best = case, {}
            for candidate in candidates_for(case):
                if compile_only:
                    candidate_index += 1
                    if (candidate_index - 1) % parts == index - 1:  # I, I + N, ...
                        compiled += 1
                        try:
                            candidate.run()
                        except Exception as error:  # out of shared memory, etc.
                            print(f"# {case.name} {candidate.mode} {candidate.config}: "
                                  f"{type(error).__name__}", flush=True)
                    continue
                try:
                    milliseconds = time_milliseconds(candidate.run)
                except Exception as error:  # out of shared memory, etc.
                    milliseconds = float("inf")
                    print(f"# {case.name} {candidate.mode} {candidate.config}: "
                          f"{type(error).__name__}", flush=True)
                records.append(dict(shape=case.name, mode=candidate.mode,
                                    config=candidate.config, ms=milliseconds))
                if out is not None:  # after every candidate: an interrupted sweep keeps them
                    write_merged_jsonl(out, records, ("shape", "mode", "config"), environment)
                if milliseconds < best.get(candidate.variant, (float("inf"),))[0]:
                    best[candidate.variant] = (milliseconds, candidate.config)
            print("\n".join(best_lines(case.name, best)), flush=True)
            current_case = None
    if interruption.interrupted and current_case is not None and best:
        measured = sum(record["shape"] == current_case.name for record in records)
        print("\n".join(best_lines(current_case.name, best,
                                   f" (partial: interrupted after {measured} candidates)")),
              flush=True)
    if out is not None and records:
        print(f"Results written to {out} ({len(records)} candidates)", flush=True)
    if compile_only:
        print(f"part {index}/{parts}: ran {compiled} candidates", flush=True)
    return INTERRUPTED_EXIT_STATUS if interruption.interrupted else 0


def _part(text: str) -> tuple[int, int]:
    """argparse type of ``--part``: ``I/N`` with 1 <= I <= N."""
    index, separator, parts = text.partition("/")
    try:
        index_value, parts_value = int(index), int(parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 3/12), got {text!r}") from None
    if not separator or not 1 <= index_value <= parts_value:
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return index_value, parts_value


def _shape_names(text: str) -> list[str]:
    """argparse type of ``--shapes``: comma-separated names of benchmark shapes."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in CASES_BY_NAME]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown shape{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid shapes: {', '.join(CASES_BY_NAME)}")
    if not names:
        raise argparse.ArgumentTypeError("no shape named")
    return names


def parse_arguments(arguments: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="merge the timings into this .jsonl (an environment line, then "
                             "one line per timed candidate) after every candidate")
    parser.add_argument("--shapes", type=_shape_names, default=None,
                        help="comma-separated shapes to sweep (default: all but the decode_ "
                             f"ones); from: {', '.join(CASES_BY_NAME)}")
    parser.add_argument("--compile-only", action="store_true",
                        help="run each candidate once (compiling it), time nothing")
    parser.add_argument("--part", type=_part, default=(1, 1),
                        help="I/N: with --compile-only, take every N-th candidate from the I-th "
                             "(default: 1/1)")
    options = parser.parse_args(arguments)
    if options.part != (1, 1) and not options.compile_only:
        parser.error("argument --part: only with --compile-only (a timing run times every "
                     "candidate)")
    return options


def main(arguments: Sequence[str] | None = None) -> int:
    """Sweep the selected shapes on the GPU; 1 without one, 130 when interrupted."""
    options = parse_arguments(arguments)
    if not torch.cuda.is_available():
        print("CUDA is not available; the attention tile sweep needs a GPU.", file=sys.stderr)
        return 1
    if options.shapes:
        selected = [CASES_BY_NAME[name] for name in options.shapes]
    else:  # decode shapes are overhead-bound: tiles hardly matter; name them to sweep
        selected = [case for case in CASES if not case.name.startswith("decode_")]
    return run_sweep(selected, gpu_candidates, gpu_milliseconds, options.out,
                     options.compile_only, options.part)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before sweeping started: nothing to summarize
        print("\nInterrupted (Ctrl-C) before any candidate ran.", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_STATUS)
