"""The contrastive-loss cases on CUDA in bf16, fp16 and fp32 (skipped without a GPU)."""

import pytest
import torch

from seeds import case_seed
from contrastive_cases import (GPU_PAIR_CASES, GPU_QUEUE_CASES, PAIR_CASES, QUEUE_CASES,
                               run_pair_case, run_queue_case)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PAIR_CASES + GPU_PAIR_CASES, ids=str)
def test_contrastive_loss_matches_reference_gpu(case, dtype):
    run_pair_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/gpu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QUEUE_CASES + GPU_QUEUE_CASES, ids=str)
def test_contrastive_loss_with_queue_matches_reference_gpu(case, dtype):
    run_queue_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/gpu"))
