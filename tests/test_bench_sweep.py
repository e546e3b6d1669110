"""The attention sweep's candidate tails (bench/sweep_attention_configs.py; CPU, no timing)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import attention_benchmark_cases as cases  # noqa: E402
import sweep_attention_configs as sweep  # noqa: E402


def test_each_ragged_axis_gets_a_tail_of_its_own():
    text = cases.CASES_BY_NAME["text_bidir_pad"]  # 35 queries, 35 keys
    # 35 = 32 + 16 queries; the 35 keys stay one 64-long tile or take a tail too.
    assert sweep._tail_options(text, 32, 64) == [(0, 0), (0, 16), (16, 0), (16, 16)]
    qformer = cases.CASES_BY_NAME["qformer_cross"]  # 32 queries, 257 keys
    assert sweep._tail_options(qformer, 32, 64) == [(0, 0), (0, 16)]
    # A tile no longer than the tail gets none.
    assert sweep._tail_options(text, 16, 64) == [(0, 0), (0, 16)]
    assert sweep._tail_options(qformer, 64, 16) == [(0, 0), (16, 0)]


def test_every_tail_option_is_a_valid_config():
    from blipfast.kernels import attention as kernel

    for case in cases.CASES:
        for block_m, block_n, _, _ in sweep.FORWARD_CANDIDATES + sweep.BACKWARD_CANDIDATES:
            for tail_m, tail_n in sweep._tail_options(case, block_m, block_n):
                kernel._check_tails(dict(BLOCK_M=block_m, BLOCK_N=block_n,
                                         BLOCK_M_TAIL=tail_m, BLOCK_N_TAIL=tail_n))
