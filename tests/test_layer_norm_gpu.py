"""The layer norm cases on CUDA in bf16, fp16 and fp32, plus wide rows and many rows
(skipped without a GPU)."""

import pytest
import torch

from seeds import case_seed
from layer_norm_cases import CASES, LayerNormCase, run_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

GPU_CASES = [
    # BLIP ViT-L / BERT-large widths, many rows (8 images x 577 patches).
    LayerNormCase("vit_l_n1024_many_rows_add", (8, 577, 1024), with_sum=True),
    LayerNormCase("eva_vit_g_n1408_fp32_params", (4, 257, 1408), param_dtype=torch.float32,
                  with_sum=True),
    LayerNormCase("n4096_row_strided", (64, 4096), layout="row_strided"),
    LayerNormCase("n4096_mean_far", (2, 33, 4096), offset=100.0, with_sum=True),
    LayerNormCase("n16384_no_residual", (9, 16384), residual=False),
    LayerNormCase("n16384_add_transposed", (5, 16384), layout="transposed", with_sum=True),
    LayerNormCase("many_rows_n64", (20000, 64)),
    LayerNormCase("many_rows_n88_no_params", (3000, 88), weight=False, bias=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=str)
def test_layer_norm_matches_reference_gpu(case, dtype):
    run_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/gpu"))
