"""The attention sweep's candidates (bench/sweep_attention_configs.py; CPU, no timing):
their tail options, and that each computes attention correctly."""

import sys
from pathlib import Path

import pytest
import torch

from seeds import case_seed
from attention_cases import AttentionCase, attention_configs, run_case

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


# --------------------------------------------------------------------------------------
# Every candidate the sweep can pick computes attention correctly: the sweep only times
# them, so a wrong but fast tile shape would win it. Each distinct tile shape (the
# candidates' warps and stages do not change what is computed) with each of its tail
# options, and for the forward the split head dim too, runs forward and backward through
# the interpreter on one ragged shape against the reference: 3 query rows on 2 key rows,
# 37 queries onto 70 keys (causal, padded), head dim 88. The keys fit one 128-long tile,
# so the 128-key candidates take the one-launch backward.
# --------------------------------------------------------------------------------------

SWEEP_CHECK_CASE = AttentionCase("sweep_check", 3, 37, 70, 1, 88, causal=True, padding=True,
                                 key_batch=2, kv_index=(0, 1, 1))


def _candidate_configs(mode: str) -> list[dict]:
    from types import SimpleNamespace

    lengths = SimpleNamespace(query_length=SWEEP_CHECK_CASE.len_q,
                              key_length=SWEEP_CHECK_CASE.len_k)
    candidates = sweep.FORWARD_CANDIDATES if mode == "forward" else sweep.BACKWARD_CANDIDATES
    configs = []
    for block_m, block_n in sorted({candidate[:2] for candidate in candidates}):
        tails = sweep._tail_options(lengths, block_m, block_n)
        for tail_m, tail_n in tails:
            config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_M_TAIL=tail_m,
                          BLOCK_N_TAIL=tail_n)
            if mode == "backward":
                configs.append(config)
                continue
            # The split head dim once per tile shape, with the most tails (the head dim
            # blocks and the sequence tiles are independent loops).
            splits = (False, True) if (tail_m, tail_n) == tails[-1] else (False,)
            configs.extend(dict(config, SPLIT_HEAD_DIM=split) for split in splits)
    return configs


def _config_id(config: dict) -> str:
    return "_".join(f"{key.lower()}{int(value)}" for key, value in config.items())


@pytest.mark.interpreter
@pytest.mark.parametrize("mode, config", [
    pytest.param(mode, config, id=f"{mode}-{_config_id(config)}")
    for mode in ("forward", "backward") for config in _candidate_configs(mode)])
def test_every_sweep_candidate_matches_the_reference(mode, config):
    # The other direction runs whole tiles (two programs here), which the interpreter
    # runs quicker than its default 16 x 32 tiles.
    whole = dict(BLOCK_M=64, BLOCK_N=128)
    configs = dict(forward=whole, backward=whole)
    with attention_configs(**dict(configs, **{mode: config})):
        run_case(SWEEP_CHECK_CASE, torch.bfloat16, "cpu",
                 seed=case_seed(f"sweep/{mode}/{_config_id(config)}"))
