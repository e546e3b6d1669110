"""The tolerance table itself: no comparison it makes can pass any answer."""

import pytest
import torch

from tolerances import ABSOLUTE_FLOOR, assert_close_to_reference


@pytest.mark.parametrize("dtype", list(ABSOLUTE_FLOOR), ids=str)
def test_zeros_fail_even_where_pytorch_is_far_off(dtype):
    # PyTorch's dtype result off by the order of the output (as a near tie in a max,
    # decided the other way, makes it): twice its error would let zeros through.
    exact = torch.linspace(-1.0, 1.0, 33, dtype=torch.float64)
    far_off = exact.flip(0).to(dtype)
    assert_close_to_reference("exact", exact.to(dtype), far_off, exact)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("zeros", torch.zeros_like(exact, dtype=dtype), far_off, exact)


def test_a_yardstick_that_is_not_finite_is_refused():
    exact = torch.ones(4, dtype=torch.float64)
    overflowed = torch.tensor([1.0, float("inf"), 1.0, 1.0], dtype=torch.float16)
    with pytest.raises(AssertionError, match="not finite, so it is no yardstick"):
        assert_close_to_reference("loss", exact.float(), overflowed, exact)


def test_the_floor_grows_with_the_output():
    # A float32 sum in the tens of thousands has an ulp of ~2e-3: more than the absolute
    # floor; rounding the output alone must pass.
    exact = torch.tensor([21845.3333333333], dtype=torch.float64)
    rounded = exact.float()
    next_up = torch.nextafter(rounded, torch.tensor([float("inf")]))
    assert_close_to_reference("sum", next_up, rounded, exact)


def test_tiny_outputs_of_tiny_inputs_are_not_within_the_floor():
    # fp16 outputs of order 1e-3 (GELU of inputs near zero) lie within the absolute floor,
    # which is for inputs of order 1; scaled to the inputs, it no longer passes zeros.
    exact = 1e-3 * torch.linspace(-1.0, 1.0, 17, dtype=torch.float64)
    same_dtype = exact.half()
    assert_close_to_reference("exact", same_dtype, same_dtype, exact, input_scale=1e-3)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("zeros", torch.zeros_like(same_dtype), same_dtype, exact,
                                  input_scale=1e-3)


def test_float32_results_of_bfloat16_computations_take_bfloat16s_row():
    # A float32 parameter gradient reduced from bf16 activations: PyTorch's own error is
    # of bf16's order (here 1% of the output). float32's row caps that at a thousandth of
    # the output, failing a kernel as accurate as PyTorch; bf16's row does not. Zeros fail
    # in either.
    exact = torch.linspace(-30.0, 30.0, 41, dtype=torch.float64)
    as_pytorch = (exact * 1.01).float()
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("grad_weight", as_pytorch, as_pytorch, exact)
    assert_close_to_reference("grad_weight", as_pytorch, as_pytorch, exact,
                              compute_dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="computing in torch.bfloat16"):
        assert_close_to_reference("grad_weight", torch.zeros_like(as_pytorch), as_pytorch,
                                  exact, compute_dtype=torch.bfloat16)


def test_several_pytorch_results_give_the_largest_of_their_errors():
    # Two float32 results of PyTorch's, computed in different orders: one happens to be
    # exact, the other off by 1e-5. The yardstick is the larger error (a kernel off by
    # 3e-5 passes with both, in either order, and fails with the exact one alone), and
    # every one must be finite.
    exact = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64)
    lucky, usual = exact.float(), (exact + 1e-5).float()
    kernel = (exact + 3e-5).float()
    assert_close_to_reference("grad", kernel, (lucky, usual), exact)
    assert_close_to_reference("grad", kernel, [usual, lucky], exact)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("grad", kernel, lucky, exact)
    overflowed = usual.clone()
    overflowed[3] = float("nan")
    with pytest.raises(AssertionError, match="not finite, so it is no yardstick"):
        assert_close_to_reference("grad", kernel, (lucky, overflowed), exact)


def test_an_output_zero_everywhere_counts_pytorchs_error_up_to_the_inputs_scale():
    # grad_q where every query row's softmax is one key: exactly 0, the cancellation of
    # terms of order 10. PyTorch's float32 result in the kernels' order is off by 3e-5,
    # a kernel by 4e-5: within twice PyTorch's error, though above the floor; the same
    # kernel fails against a yardstick that is exact. PyTorch's error still counts no more
    # than a thousandth of the inputs' scale (of the order of the inputs, it would pass
    # anything), and scaled-down inputs scale that limit down with them.
    exact = torch.zeros(8, dtype=torch.float64)
    pytorch = torch.full((8,), 3e-5)
    kernel = torch.full((8,), 4e-5)
    assert_close_to_reference("grad_q", kernel, pytorch, exact)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("grad_q", kernel, torch.zeros(8), exact)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("grad_q", torch.full((8,), 0.5), torch.full((8,), 0.5),
                                  exact)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference("grad_q", kernel, pytorch, exact, input_scale=1e-4)
