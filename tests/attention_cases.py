"""Attention test cases shared by the CPU (interpreter) and GPU test modules.

Each case draws fresh random inputs, runs ``blipfast.ops.attention`` forward and backward,
and compares the output and the gradients of q, k and v with the float64 reference, using
the tolerance table in ``tolerances.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

import blipfast
from blipfast import reference
from interpreter_like_gpu import in_each_matmul_order
from tolerances import assert_close_to_reference


@dataclass(frozen=True)
class AttentionCase:
    name: str
    batch: int
    len_q: int
    len_k: int
    heads: int
    head_dim: int
    causal: bool = False
    padding: bool = False
    key_batch: Optional[int] = None  # with kv_index: the batch of k and v
    kv_index: Optional[tuple[int, ...]] = None
    layout: str = "contiguous"  # or "sdpa_transposed", "packed_qkv", "odd_strides"
    fully_masked_key_rows: tuple[int, ...] = ()  # key batch rows with every key masked
    # key_padding_mask and kv_index passed as strided views of larger buffers
    strided_mask_and_index: bool = False
    softmax_scale: Optional[float] = None  # None: the op's default, 1 / sqrt(head_dim)

    def __str__(self) -> str:
        return self.name


CASES = [
    AttentionCase("single_token", 2, 1, 1, 2, 32),
    AttentionCase("odd_self_padded", 2, 7, 7, 2, 64, padding=True),
    AttentionCase("text_causal_padded", 2, 35, 35, 2, 64, causal=True, padding=True),
    AttentionCase("text_bidirectional_padded_d80", 3, 35, 35, 1, 80, padding=True),
    AttentionCase("text_to_image_cross", 2, 35, 577, 1, 64),
    AttentionCase("qformer_cross_d96", 2, 32, 65, 2, 96),
    AttentionCase("vit_g_self_d88", 1, 67, 67, 2, 88),
    AttentionCase("head_dim_128", 1, 40, 40, 1, 128, causal=True),
    AttentionCase("causal_more_queries_than_keys", 2, 50, 21, 1, 32, causal=True, padding=True),
    AttentionCase("causal_fewer_queries_than_keys", 2, 21, 50, 1, 32, causal=True),
    # Query 31 sees keys 0-64, and key 64 starts a key tile both at the interpreter's
    # tiles (16 x 32) and the GPU's (32 x 64): the key loop must reach it.
    AttentionCase("causal_last_key_starts_a_tile", 1, 32, 65, 1, 16, causal=True),
    AttentionCase("decode_step_over_cache", 3, 1, 45, 2, 64, causal=True, padding=True),
    AttentionCase("kv_index_repeats", 4, 9, 33, 2, 32, padding=True,
                  key_batch=3, kv_index=(2, 0, 2, 2)),
    AttentionCase("kv_index_causal_self", 3, 19, 19, 1, 64, causal=True, padding=True,
                  key_batch=2, kv_index=(1, 1, 0)),
    AttentionCase("fully_masked_rows", 3, 12, 40, 2, 32, padding=True,
                  fully_masked_key_rows=(1,)),
    AttentionCase("mask_and_kv_index_views", 3, 6, 37, 1, 16, padding=True,
                  key_batch=2, kv_index=(1, 0, 1), strided_mask_and_index=True),
    AttentionCase("sdpa_layout_view", 2, 23, 41, 3, 32, layout="sdpa_transposed"),
    AttentionCase("packed_qkv_view", 2, 30, 30, 2, 64, causal=True, padding=True,
                  layout="packed_qkv"),
    # Views of wider buffers whose length and head strides are odd (41 elements per
    # head): the kernels must not be told the strides are multiples of a vector.
    AttentionCase("odd_strides_view", 2, 13, 21, 3, 40, causal=True, padding=True,
                  layout="odd_strides"),
]


def _make_inputs(case: AttentionCase, dtype: torch.dtype, device: str, generator: torch.Generator):
    key_batch = case.key_batch or case.batch
    shape_q = (case.batch, case.len_q, case.heads, case.head_dim)
    shape_k = (key_batch, case.len_k, case.heads, case.head_dim)

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device, dtype)

    if case.layout == "sdpa_transposed":
        # Tensors stored as (B, H, L, D), viewed as (B, L, H, D).
        q = random(shape_q[0], shape_q[2], shape_q[1], shape_q[3]).transpose(1, 2)
        k = random(shape_k[0], shape_k[2], shape_k[1], shape_k[3]).transpose(1, 2)
        v = random(shape_k[0], shape_k[2], shape_k[1], shape_k[3]).transpose(1, 2)
    elif case.layout == "packed_qkv":
        # One fused projection output (B, L, 3, H, D), split into strided views.
        assert case.len_q == case.len_k and key_batch == case.batch
        packed = random(case.batch, case.len_q, 3, case.heads, case.head_dim)
        q, k, v = packed.unbind(2)
    elif case.layout == "odd_strides":
        # Each head stored in head_dim + 1 elements, the last one cut off.
        q = random(*shape_q[:3], case.head_dim + 1)[..., :case.head_dim]
        k = random(*shape_k[:3], case.head_dim + 1)[..., :case.head_dim]
        v = random(*shape_k[:3], case.head_dim + 1)[..., :case.head_dim]
    else:
        q, k, v = random(*shape_q), random(*shape_k), random(*shape_k)

    mask = None
    if case.padding or case.fully_masked_key_rows:
        lengths = torch.randint(1, case.len_k + 1, (key_batch,), generator=generator)
        mask = torch.arange(case.len_k)[None, :] < lengths[:, None]
        for row in case.fully_masked_key_rows:
            mask[row] = False
        mask = mask.to(device)
    kv_index = None
    if case.kv_index is not None:
        kv_index = torch.tensor(case.kv_index, dtype=torch.int64, device=device)
    if case.strided_mask_and_index:
        # Views whose storage holds other values in between: a kernel that ignored their
        # strides would read those (the negated mask; the next key batch row).
        mask = torch.stack([mask, ~mask], dim=2)[:, :, 0]
        kv_index = torch.stack([kv_index, (kv_index + 1) % key_batch], dim=1)[:, 0]
        assert mask.stride(1) == 2 and kv_index.stride() == (2,)
    return q, k, v, mask, kv_index


def run_case(case: AttentionCase, dtype: torch.dtype, device: str, seed: int) -> None:
    """Compare forward and all input gradients with the reference on fresh inputs."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, mask, kv_index = _make_inputs(case, dtype, device, generator)
    grad_out = torch.randn(case.batch, case.len_q, case.heads, case.head_dim,
                           generator=generator).to(device, dtype)
    options = dict(causal=case.causal, key_padding_mask=mask, kv_index=kv_index,
                   softmax_scale=case.softmax_scale)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]

    out = blipfast.ops.attention(*inputs, **options)
    assert out.dtype == dtype and out.shape == grad_out.shape
    grads = torch.autograd.grad(out, inputs, grad_out)

    def reference_run(cast_dtype, upcast):
        leaves = [t.detach().to(cast_dtype).requires_grad_() for t in (q, k, v)]
        result = reference.attention(*leaves, upcast=upcast, **options)
        return (result, *torch.autograd.grad(result, leaves, grad_out.to(cast_dtype)))

    def flash_order_run():
        return reference.attention_with_flash_gradients(
            *(t.detach() for t in (q, k, v)), grad_out, **options)

    exact = reference_run(torch.float64, True)
    # PyTorch's own error, the tolerances' yardstick, is the largest of its results in the
    # dtype computed by autograd and in the kernels' own order (the softmax's backward
    # from the output, as FlashAttention-2 and PyTorch's flash backend compute it; where a
    # row's softmax is one key, that order alone leaves a rounding autograd's does not),
    # on CPU in float32 each also with PyTorch's matmuls in a GPU's order, as the
    # interpreter adds the kernels' dots (a very sharp softmax follows the scores' last
    # bits, which this CPU's BLAS rounds less than that order does).
    yardsticks = in_each_matmul_order(device, dtype,
                                      [lambda: reference_run(dtype, False), flash_order_run])
    for index, name in enumerate(("out", "grad_q", "grad_k", "grad_v")):
        actual = out if index == 0 else grads[index - 1]
        assert_close_to_reference(f"{case}/{name}", actual,
                                  [results[index] for results in yardsticks], exact[index])

    if mask is not None:
        # Query rows with no key at all: output and grad_q exactly 0.
        key_rows = kv_index if kv_index is not None else torch.arange(case.batch, device=device)
        empty = ~mask[key_rows].any(dim=1)
        if empty.any():
            assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()


def random_cases(count: int, seed: int) -> list[tuple[AttentionCase, str, bool]]:
    """``count`` cases drawing every option of the op at once (lengths, head dims, causal,
    padding, fully masked rows, kv_index, layouts, strided mask and index, softmax_scale),
    each with a tile config name of ``INTERPRETER_TAIL_CONFIGS`` ("default" for none) and
    whether the forward splits the head dim: the combinations the listed cases do not
    name. Deterministic in ``seed``; the name spells out each case."""
    import random

    draw = random.Random(seed)
    cases = []
    for number in range(count):
        batch, heads = draw.randint(1, 3), draw.randint(1, 3)
        head_dim = draw.choice((16, 24, 40, 64, 88, 96, 128))
        len_q = draw.randint(1, 40)
        len_k = len_q if draw.random() < 0.3 else draw.randint(1, 70)  # self-attention
        causal, padding = draw.random() < 0.5, draw.random() < 0.6
        key_batch = kv_index = None
        if draw.random() < 0.4:
            key_batch = draw.randint(1, 3)
            kv_index = tuple(draw.randrange(key_batch) for _ in range(batch))
        layouts = ["contiguous", "sdpa_transposed", "odd_strides"]
        if len_q == len_k and kv_index is None:
            layouts.append("packed_qkv")
        layout = draw.choice(layouts)
        # one key batch row without keys, never the only one (all outputs 0 checks little)
        fully_masked = ((draw.randrange(key_batch or batch),)
                        if padding and (key_batch or batch) > 1 and draw.random() < 0.3
                        else ())
        strided = padding and kv_index is not None and draw.random() < 0.5
        softmax_scale = draw.choice((None, None, 0.05, 1.0, 2.5))
        tiles = draw.choice(["default", *INTERPRETER_TAIL_CONFIGS])
        split = bool(head_dim & (head_dim - 1)) and draw.random() < 0.5
        name = (f"random{number}_b{batch}_q{len_q}_k{len_k}_h{heads}_d{head_dim}"
                f"{'_causal' if causal else ''}{'_padded' if padding else ''}"
                f"{'_empty' if fully_masked else ''}"
                f"{f'_kv{key_batch}' if kv_index else ''}{'_strided' if strided else ''}"
                f"_{layout}_scale{softmax_scale}_{tiles}{'_split' if split else ''}")
        cases.append((AttentionCase(name, batch, len_q, len_k, heads, head_dim, causal,
                                    padding, key_batch, kv_index, layout, fully_masked,
                                    strided, softmax_scale), tiles, split))
    return cases


# Cases whose head dim the forward kernel can split into a power-of-2 block and a tail
# block (SPLIT_HEAD_DIM); run again with the split forced.
SPLIT_HEAD_DIM_CASES = [case for case in CASES if case.head_dim & (case.head_dim - 1)] + [
    AttentionCase("causal_padded_d40", 2, 19, 19, 2, 40, causal=True, padding=True),
]

# Tile configs with sequence tails (BLOCK_M_TAIL / BLOCK_N_TAIL), merged into the default
# configs. On the interpreter (whose default tiles are 16 x 32): 16-long tails after
# 32-long tiles, and a tail as long as the tile (whole tiles unmasked, then one masked).
INTERPRETER_TAIL_CONFIGS = {
    "tails_16": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_M_TAIL=16, BLOCK_N_TAIL=16),
    "tail_is_block": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_M_TAIL=16, BLOCK_N_TAIL=32),
    # The axes take tails independently (the sweep tries a query tail alone).
    "query_tail_only": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_M_TAIL=16, BLOCK_N_TAIL=0),
}
# On a GPU: 16-long tails after the default tiles, on both axes or on the queries alone.
GPU_TAIL_CONFIGS = {"tails_16": dict(BLOCK_M_TAIL=16, BLOCK_N_TAIL=16),
                    "query_tail_16": dict(BLOCK_M_TAIL=16, BLOCK_N_TAIL=0)}


def clear_attention_config_caches() -> None:
    """Forget the attention launchers' default configs cached per shape, so that a change
    to how they are chosen takes effect (and does not outlive the change)."""
    from blipfast.kernels import attention as kernel

    kernel._default_forward_constants.cache_clear()
    kernel._default_backward_config.cache_clear()


@contextlib.contextmanager
def attention_configs(forward: Optional[dict] = None, backward: Optional[dict] = None):
    """Run the attention kernels with their default tile configs updated by ``forward``
    and ``backward``, and check on leaving that each given override was used.

    The launchers cache their default configs per shape, so the caches are cleared on
    entering and leaving: an override must not be hidden by a config cached before it,
    nor outlive the block.
    """
    from blipfast.kernels import attention as kernel

    default_forward, default_backward = kernel._forward_config, kernel._backward_config
    used = {"forward": 0, "backward": 0}

    def forward_config(*shape):
        used["forward"] += 1
        return {**default_forward(*shape), **forward}

    def backward_config(*shape):
        used["backward"] += 1
        return {**default_backward(*shape), **backward}

    if forward is not None:
        kernel._forward_config = forward_config
    if backward is not None:
        kernel._backward_config = backward_config
    clear_attention_config_caches()
    try:
        yield
    finally:
        kernel._forward_config, kernel._backward_config = default_forward, default_backward
        clear_attention_config_caches()
    assert forward is None or used["forward"], "the forward config override was not used"
    assert backward is None or used["backward"], "the backward config override was not used"
