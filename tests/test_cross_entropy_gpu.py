"""The cross-entropy cases on CUDA in bf16, fp16 and fp32, a BLIP captioning LM loss
(64 captions x 34 predicted tokens x 30524 classes), and torch.compile with inductor
(skipped without a GPU)."""

import pytest
import torch

from blipfast import reference
from blipfast.ops import cross_entropy
from seeds import case_seed
from cross_entropy_cases import CASES, CrossEntropyCase, check_confident_rows, run_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_CASES = CASES + [
    CrossEntropyCase("blip_lm_64x34_v30524", (64, 34, 30524), label_smoothing=0.1,
                     ignored_fraction=0.2, layout="shifted", scale=3.0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cross_entropy_matches_reference_gpu(case, dtype):
    run_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/gpu"))


def test_confident_rows_are_as_exact_as_pytorch_gpu():
    check_confident_rows("cuda")


def test_torch_compile_inductor_gpu():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 36, 30524, generator=generator).to("cuda", torch.bfloat16)
    labels = torch.randint(0, 30524, (8, 36), generator=generator).cuda()

    def step(logits):
        return cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    leaf = logits.clone().requires_grad_()
    loss = compiled(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    expected_leaf = logits.clone().requires_grad_()
    expected = reference.cross_entropy(expected_leaf[:, :-1], labels[:, 1:], label_smoothing=0.1)
    (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=2e-2)
