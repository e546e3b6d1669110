"""The attention cases on CUDA in bf16, fp16 and fp32 (skipped without a GPU)."""

import pytest
import torch

from seeds import case_seed
from attention_cases import (
    CASES, GPU_TAIL_CONFIGS, SPLIT_HEAD_DIM_CASES, attention_configs, run_case)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_matches_reference_gpu(case, dtype):
    run_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/gpu"))


@pytest.mark.parametrize("split", [False, True], ids=["padded", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", SPLIT_HEAD_DIM_CASES, ids=str)
def test_attention_head_dim_blocks_match_reference_gpu(case, dtype, split):
    """Both forward head-dim layouts, whichever the default config picks."""
    with attention_configs(forward=dict(SPLIT_HEAD_DIM=split)):
        run_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/{split}/gpu"))


@pytest.mark.parametrize("name", sorted(GPU_TAIL_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_sequence_tails_match_reference_gpu(case, dtype, name):
    """Queries and keys cut into whole tiles and then 16-long tail tiles."""
    config = GPU_TAIL_CONFIGS[name]
    with attention_configs(forward=config, backward=config):
        run_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/{name}/gpu"))
