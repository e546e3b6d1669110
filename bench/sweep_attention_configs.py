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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def main() -> None:
    import triton

    from attention_benchmark_cases import CASES, make_inputs
    from result_files import write_atomically
    from blipfast.kernels import attention as kernel

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="")
    parser.add_argument("--compile-only", action="store_true",
                        help="run each candidate once (compiling it), time nothing")
    parser.add_argument("--part", default="1/1",
                        help="I/N: with --compile-only, take every N-th candidate from the I-th")
    arguments = parser.parse_args()
    part, parts = (int(value) for value in arguments.part.split("/"))
    candidate_index = 0
    records = []
    for case in CASES:
        if arguments.shapes and case.name not in arguments.shapes.split(","):
            continue
        if not arguments.shapes and case.name.startswith("decode_"):
            continue  # overhead-bound: tiles hardly matter; name them in --shapes to sweep
        inputs = make_inputs(case, requires_grad=False)
        q, k, v, mask = inputs.query, inputs.key, inputs.value, inputs.key_padding_mask
        grad_out = inputs.output_gradient
        scale = case.head_dim ** -0.5
        out, log_sum_exp = kernel.attention_forward(q, k, v, mask, None, case.causal, scale)
        best = {}
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

                    def run():
                        kernel.attention_forward(q, k, v, mask, None, case.causal, scale,
                                                 config=config)
                else:
                    def run():
                        kernel.attention_backward(grad_out, q, k, v, out, log_sum_exp, mask,
                                                  None, case.causal, scale, config=config)
                if arguments.compile_only:
                    candidate_index += 1
                    if candidate_index % parts == part - 1:
                        try:
                            run()
                        except Exception as error:  # out of shared memory, etc.
                            print(f"# {case.name} {mode} {config}: {type(error).__name__}")
                    continue
                try:
                    milliseconds = triton.testing.do_bench(run, warmup=10, rep=40)
                except Exception as error:  # out of shared memory, etc.
                    milliseconds = float("inf")
                    print(f"# {case.name} {mode} {config}: {type(error).__name__}", flush=True)
                record = dict(shape=case.name, mode=mode, config=config, ms=milliseconds)
                records.append(record)
                if arguments.out:  # after every candidate: an interrupted sweep keeps its records
                    write_atomically(arguments.out,
                                     "".join(json.dumps(r) + "\n" for r in records))
                # The best of each head-dim layout, with and without each axis's tail.
                variant = mode + (" split" if split else "") + (" query tail" if tail_m else "") \
                    + (" key tail" if tail_n else "")
                if milliseconds < best.get(variant, (float("inf"),))[0]:
                    best[variant] = (milliseconds, config)
        for variant, (milliseconds, config) in best.items():
            print(f"{case.name:24s} {variant:15s} best {milliseconds:.4f} ms {config}",
                  flush=True)


if __name__ == "__main__":
    main()
