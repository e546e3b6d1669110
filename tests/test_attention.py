"""Fused attention against the reference on CPU (Triton interpreter): float32, float16,
and bfloat16 (with the interpreter's bf16 dot and rounding made a GPU's:
``interpreter_like_gpu.py``). The same cases run compiled on CUDA in
``test_attention_gpu.py``.
"""

import pytest
import torch

from seeds import case_seed, draw_seed
from attention_cases import (
    CASES, INTERPRETER_TAIL_CONFIGS, SPLIT_HEAD_DIM_CASES, attention_configs, random_cases,
    run_case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.interpreter
def test_attention_matches_reference_cpu(case, dtype):
    run_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SPLIT_HEAD_DIM_CASES, ids=str)
@pytest.mark.interpreter
def test_attention_split_head_dim_matches_reference_cpu(case, dtype):
    with attention_configs(forward=dict(SPLIT_HEAD_DIM=True)):
        run_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}/split"))


@pytest.mark.parametrize("tiles", [
    pytest.param((name, dtype), id=f"{name}-{dtype}")
    for name, dtypes in (("tails_16", (torch.float32, torch.float16)),
                         ("tail_is_block", (torch.float32,)),
                         ("query_tail_only", (torch.float32,)))
    for dtype in dtypes])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.interpreter
def test_attention_sequence_tails_match_reference_cpu(case, tiles):
    """Queries and keys cut into whole tiles and then shorter tail tiles, forward and
    backward."""
    name, dtype = tiles
    config = INTERPRETER_TAIL_CONFIGS[name]
    with attention_configs(forward=config, backward=config):
        run_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}/{name}"))


@pytest.mark.parametrize("case, tiles, split, dtype", [
    pytest.param(*drawn, dtype, id=f"{drawn[0]}-{dtype}")
    for count, seed, dtype in ((16, 2033, torch.float32), (8, 2034, torch.bfloat16))
    for drawn in random_cases(count, seed=draw_seed(seed))])
@pytest.mark.interpreter
def test_attention_random_option_combinations_match_reference_cpu(case, tiles, split, dtype):
    """Every option at once in drawn combinations (16 in fp32, 8 more in bf16), forward
    and gradients."""
    config = dict(INTERPRETER_TAIL_CONFIGS.get(tiles, {}))
    with attention_configs(forward=dict(config, SPLIT_HEAD_DIM=split), backward=config):
        run_case(case, dtype, "cpu", seed=case_seed(case.name))


@pytest.mark.parametrize("tails", [dict(BLOCK_M_TAIL=8), dict(BLOCK_N_TAIL=24),
                                   dict(BLOCK_M_TAIL=64)], ids=str)
def test_attention_bad_sequence_tail_names_it(tails):
    from blipfast.kernels import attention as kernel

    q = torch.randn(1, 5, 1, 16)
    config = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, **tails)
    with pytest.raises(ValueError, match=next(iter(tails))):
        kernel.attention_forward(q, q, q, None, None, False, 1.0, config=config)
    with pytest.raises(ValueError, match=next(iter(tails))):
        kernel.attention_backward(q, q, q, q, q, q[:, :, 0].transpose(1, 2).float(), None,
                                  None, False, 1.0, config=config)


def test_split_head_dim_blocks_cover_the_head_dim_and_pad_less():
    """SPLIT_HEAD_DIM's blocks for every supported head dim: powers of 2 of at least 16
    (tl.dot's smallest operand), covering the head dim; split only where that pads less
    than one power-of-2 block (88: 64 + 32 instead of 128; never 16 + 16 for 24)."""
    from blipfast.kernels import attention as kernel

    for head_dim in range(16, 129):
        padded = max(16, 1 << (head_dim - 1).bit_length())
        assert kernel._forward_head_dim_blocks(head_dim, False) == (padded, 0)
        block, tail = kernel._forward_head_dim_blocks(head_dim, True)
        for size in (block, tail) if tail else (block,):
            assert size >= 16 and size & (size - 1) == 0, (head_dim, block, tail)
        assert block + tail >= head_dim, (head_dim, block, tail)
        assert (block, tail) == (padded, 0) or block + tail < padded, (head_dim, block, tail)
    assert kernel._forward_head_dim_blocks(88, True) == (64, 32)
    assert kernel._forward_head_dim_blocks(24, True) == (32, 0)


@pytest.mark.interpreter
def test_log_sum_exp_of_a_query_without_keys_is_plus_infinity():
    """The forward's saved log-sum-exp, as documented: +inf for a query whose keys are all
    masked (so exp2(s - lse) is 0 for it in the backward without a mask)."""
    from blipfast.kernels import attention as kernel

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 1, 16, generator=generator) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    for causal in (False, True):
        out, log_sum_exp = kernel.attention_forward(q, k, v, mask, None, causal, 0.25)
        assert log_sum_exp.shape == (2, 1, 5)
        assert torch.isinf(log_sum_exp[1]).all() and (log_sum_exp[1] > 0).all()
        assert torch.isfinite(log_sum_exp[0]).all() and (out[1] == 0).all()
