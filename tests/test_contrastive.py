"""Fused contrastive losses against the reference on CPU (Triton interpreter): float32,
float16 and bfloat16 (the interpreter's bf16 made a GPU's: ``interpreter_like_gpu.py``).
The same cases run compiled on CUDA in ``test_contrastive_gpu.py``."""

import pytest
import torch

from seeds import case_seed, draw_seed
from contrastive_cases import (PAIR_CASES, QUEUE_CASES, random_cases, run_pair_case,
                               run_queue_case)

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _with_dtype(cases, dtype):
    return [pytest.param(case, dtype, id=f"{case}-{dtype}") for case in cases]


# Drawn combinations of each form: 8 in fp32, 4 more in bf16.
_PAIR_FP32, _QUEUE_FP32 = random_cases(8, seed=draw_seed(2026))
_PAIR_BF16, _QUEUE_BF16 = random_cases(4, seed=draw_seed(2027))
RANDOM_PAIR_CASES = _with_dtype(_PAIR_FP32, torch.float32) + _with_dtype(_PAIR_BF16, torch.bfloat16)
RANDOM_QUEUE_CASES = (_with_dtype(_QUEUE_FP32, torch.float32)
                      + _with_dtype(_QUEUE_BF16, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PAIR_CASES, ids=str)
def test_contrastive_loss_matches_reference_cpu(case, dtype):
    run_pair_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QUEUE_CASES, ids=str)
def test_contrastive_loss_with_queue_matches_reference_cpu(case, dtype):
    run_queue_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}"))


@pytest.mark.parametrize("case, dtype", RANDOM_PAIR_CASES)
def test_contrastive_loss_random_option_combinations_cpu(case, dtype):
    """Options drawn together (fp32, and more in bf16), loss and every gradient."""
    run_pair_case(case, dtype, "cpu", seed=case_seed(case.name))


@pytest.mark.parametrize("case, dtype", RANDOM_QUEUE_CASES)
def test_contrastive_loss_with_queue_random_option_combinations_cpu(case, dtype):
    run_queue_case(case, dtype, "cpu", seed=case_seed(case.name))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("queries, distill", [(0, False), (3, False), (0, True)])
def test_rectangular_score_matrix_engine(queries, distill, dtype):
    """The kernels' general form, R != C, with uneven per-row and per-column loss
    gradients (as in the multi-rank problems), against its reference."""
    from blipfast.kernels.contrastive import contrastive_forward_op
    from blipfast import reference
    from contrastive_cases import normalized
    from tolerances import assert_close_to_reference

    generator = torch.Generator().manual_seed(case_seed(f"{queries}{distill}{dtype}"))
    num_rows, num_columns, dim = 23, 41, 24
    rows = normalized(*((num_rows, queries, dim) if queries else (num_rows, dim)),
                      generator=generator).to(dtype)
    columns = normalized(num_columns, dim, generator=generator).to(dtype)
    teacher = normalized(num_rows, dim, generator=generator).to(dtype) if distill else None
    row_ids = torch.randint(0, 12, (num_rows,), generator=generator)
    column_ids = torch.randint(0, 12, (num_columns,), generator=generator)
    scale = torch.tensor(9.0)
    row_weights = torch.rand(num_rows, generator=generator, dtype=torch.float64)
    column_weights = torch.rand(num_columns, generator=generator, dtype=torch.float64) * 3
    options = dict(alpha=0.3 if distill else 0.0, label_smoothing=0.2)

    leaves = [t.clone().requires_grad_() for t in (rows, columns, scale)]
    if distill:  # distillation keys are constants (momentum features and queues)
        leaves[1] = columns
    row_losses, column_losses = contrastive_forward_op(
        leaves[0], leaves[1], leaves[2], row_ids, column_ids, teacher, None, True,
        not distill, options["alpha"], options["label_smoothing"], 0, 0)[:2]
    total = (row_losses * row_weights.float()).sum()
    if not distill:  # column gradients are not offered with distillation targets
        total = total + (column_losses * column_weights.float()).sum()
    grads = torch.autograd.grad(total, leaves if not distill else [leaves[0], leaves[2]])

    def run_reference(cast_dtype, upcast):
        inputs = [t.detach().to(cast_dtype).requires_grad_() for t in (rows, columns)]
        inputs.append(scale.double().requires_grad_() if upcast else scale.clone().requires_grad_())
        cast_teacher = teacher.to(cast_dtype) if distill else None
        row_ref, column_ref = reference.score_matrix_cross_entropy(
            *inputs, row_ids, column_ids, teacher_feat=cast_teacher, upcast=upcast, **options)
        weight_dtype = row_ref.dtype
        result = (row_ref * row_weights.to(weight_dtype)).sum()
        if not distill:
            result = result + (column_ref * column_weights.to(weight_dtype)).sum()
        wrt = inputs if not distill else [inputs[0], inputs[2]]
        return (row_ref, column_ref, *torch.autograd.grad(result, wrt))

    exact = run_reference(torch.float64, True)
    same = run_reference(dtype, False)
    actual = (row_losses, column_losses) + tuple(grads)
    names = ["row_losses", "column_losses"] + (["grad_rows", "grad_columns", "grad_scale"]
                                               if not distill else ["grad_rows", "grad_scale"])
    for index, name in enumerate(names):
        if distill and name == "column_losses":
            continue
        assert_close_to_reference(name, actual[index], same[index], exact[index])


@pytest.mark.parametrize("used", ["rows", "columns"])
def test_a_term_whose_losses_are_unused_adds_no_gradient(used):
    """Both terms computed, the loss built from one: the other's missing gradient counts
    as zero."""
    from blipfast.kernels.contrastive import contrastive_forward_op
    from blipfast import reference
    from contrastive_cases import normalized

    generator = torch.Generator().manual_seed(7)
    rows, columns = normalized(13, 16, generator=generator), normalized(19, 16, generator=generator)
    row_ids = torch.randint(0, 5, (13,), generator=generator)
    column_ids = torch.randint(0, 5, (19,), generator=generator)

    def gradients(losses_of):
        leaves = [rows.clone().requires_grad_(), columns.clone().requires_grad_(),
                  torch.tensor(6.0, requires_grad=True)]
        row_losses, column_losses = losses_of(*leaves)
        return torch.autograd.grad((row_losses if used == "rows" else column_losses).sum(),
                                   leaves)

    actual = gradients(lambda r, c, s: contrastive_forward_op(
        r, c, s, row_ids, column_ids, None, None, True, True, 0.0, 0.0, 0, 0)[:2])
    expected = gradients(lambda r, c, s: reference.score_matrix_cross_entropy(
        r, c, s, row_ids, column_ids))
    for name, a, e in zip(("rows", "columns", "scale"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)
