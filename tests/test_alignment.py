"""The alignment fact launchers pass to kernels (``blipfast.kernels._alignment``): too
small costs speed, too large gives wrong results, so it is checked exactly here, and the
kernels' tests run views whose strides are not multiples of a vector."""

import torch

from blipfast.kernels._alignment import stride_multiple


def test_contiguous_heads_of_88_are_multiples_of_a_16_byte_vector():
    heads = torch.empty(2, 35, 16, 88, dtype=torch.bfloat16)
    assert stride_multiple(heads) == 8
    assert stride_multiple(heads.float()) == 4  # 16 bytes of float32


def test_the_smallest_multiple_over_all_strides_and_tensors_wins():
    logits = torch.empty(4, 35, 30524, dtype=torch.bfloat16)[:, :-1]  # rows of 30524
    assert stride_multiple(logits) == 4
    odd = torch.empty(2, 13, 3, 41, dtype=torch.float16)[..., :40]
    assert stride_multiple(odd) == 1
    aligned = torch.empty(2, 13, 3, 64, dtype=torch.float16)
    assert stride_multiple(aligned, odd) == 1
    assert stride_multiple(aligned, aligned[:, :, :, :32]) == 8


def test_broadcast_and_last_strides_do_not_limit_it():
    expanded = torch.empty(1, 1, 64, dtype=torch.bfloat16).expand(5, 7, 64)  # strides 0
    assert stride_multiple(expanded) == 8
    strided_columns = torch.empty(64, 3, dtype=torch.bfloat16)[:, :2]  # last stride 1
    assert stride_multiple(strided_columns) == 1  # the row stride, 3, decides


def test_sizes_a_kernel_masks_with_limit_it_too():
    logits = torch.empty(6, 1000, dtype=torch.bfloat16)
    assert stride_multiple(logits) == 8
    assert stride_multiple(logits, sizes=(1000,)) == 8
    assert stride_multiple(logits, sizes=(300,)) == 4
    assert stride_multiple(logits, sizes=(67,)) == 1
