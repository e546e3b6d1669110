"""Fused attention against the reference on CPU (Triton interpreter): float32 and float16.

bf16 is not tested here: the interpreter does not support bf16 ``tl.dot``. The same cases
run on CUDA in bf16 and fp16 in ``test_attention_gpu.py``.
"""

import zlib

import pytest
import torch

from attention_cases import (
    CASES, SPLIT_HEAD_DIM_CASES, attention_configs, run_case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_matches_reference_cpu(case, dtype):
    run_case(case, dtype, "cpu", seed=zlib.crc32(f"{case}/{dtype}".encode()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", SPLIT_HEAD_DIM_CASES, ids=str)
def test_attention_split_head_dim_matches_reference_cpu(case, dtype):
    with attention_configs(forward=dict(SPLIT_HEAD_DIM=True)):
        run_case(case, dtype, "cpu", seed=zlib.crc32(f"{case}/{dtype}/split".encode()))

