"""Fused multi-head attention in Triton: forward and backward.

Layouts: q is (B, Lq, H, D); k and v are (Bk, Lk, H, D); any strides. The output is
(B, Lq, H, D) and the saved log-sum-exp is (B, H, Lq) in float32, in base-2 units of the
scaled scores (``log2(sum_j exp2(s_ij))`` with ``s = q.k * softmax_scale * log2(e)``).

Masks, all applied inside the kernels (no L x L tensor is ever built):
- ``causal``: query i sees key j when ``j <= i + (Lk - Lq)`` (bottom-right aligned).
- ``key_mask``: uint8 (Bk, Lk), nonzero = attend.
- ``kv_index``: int (B,), any strides; query batch row b reads k[kv_index[b]],
  v[kv_index[b]] and that row of the mask; gradients into k and v are summed over the
  rows sharing them.

A query row whose keys are all masked has output 0, log-sum-exp +inf, and gradient 0.

Kernels:
- ``_attention_forward_kernel``: one program per (query tile, batch*head); online softmax
  over key tiles. The head dim is held as one power-of-2 block padded up, or (config
  SPLIT_HEAD_DIM) as a power-of-2 block plus a tail block, which pads less (88: 64 + 32).
- ``_attention_backward_dq_kernel``: one program per (query tile, batch*head); computes
  delta = rowsum(dO * O) (stored for the next kernel) and dQ by looping over key tiles.
- ``_attention_backward_dkdv_kernel``: one program per (key tile, key batch*head); loops
  over every query batch row that reads this key batch and every query tile, and
  accumulates dK and dV in registers (deterministic, no atomics). When the keys fit in one
  tile (short text), it also computes delta and dQ itself, so the whole backward is one
  launch.

Tiles: queries in BLOCK_M rows, keys in BLOCK_N. With the configs' BLOCK_M_TAIL /
BLOCK_N_TAIL, a length is cut into whole tiles and then shorter tail tiles (577 image
tokens: nine 64-long tiles and one 16-long tile, not ten 64-long ones); each kernel is then
the dispatch to a body written once for any tile length (``_attention_forward_rows``,
``_attention_backward_dq_rows``, ``_attention_backward_dkdv_keys``) and its loops call a
per-tile step written once (``_forward_key_tile``, ``_dq_key_tile``, ``_dkdv_query_tile``).

This file knows nothing of models. Launchers take validated tensors; argument checking
lives in ``blipfast.ops``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from blipfast.kernels._alignment import known_multiple, stride_multiple
from blipfast.kernels._runtime import (
    cdiv, dot_precision, first_derivative_only, interpreter_enabled, needs_autograd,
    next_power_of_2, savable)

LOG2_E = 1.4426950408889634


# --------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _forward_head_dim_blocks(head_dim: int, split: bool) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D_TAIL) of the forward kernel: the head dim in one power-of-2 block
    padded up (tail 0), or, with ``split``, a power-of-2 block plus a smaller power-of-2
    tail block when that pads less (head dim 88: 64 + 32 = 96 instead of 128)."""
    padded = _block_d(head_dim)
    if split and head_dim > 16:
        block = next_power_of_2(head_dim) // 2 if head_dim & (head_dim - 1) else head_dim
        tail = max(16, next_power_of_2(head_dim - block)) if head_dim > block else 0
        if tail and block + tail < padded:
            return block, tail
    return padded, 0


def _forward_config(len_q: int, len_k: int, head_dim: int) -> dict:
    """Tile sizes for the forward kernel: BLOCK_M, BLOCK_N, num_warps, num_stages,
    SPLIT_HEAD_DIM (see ``_forward_head_dim_blocks``), and BLOCK_M_TAIL / BLOCK_N_TAIL
    (0 = none; see the comment above ``_full_tiles_end``)."""
    if interpreter_enabled():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, SPLIT_HEAD_DIM=False,
                    BLOCK_M_TAIL=0, BLOCK_N_TAIL=0)
    block_m = 32 if len_q <= 32 else 64 if len_q <= 64 else 128
    warps = 4 if block_m <= 64 else 8
    # SPLIT_HEAD_DIM and the tails are candidates of bench/sweep_attention_configs.py,
    # off until measured. The backward's probabilities exp2(s - lse) need the forward's
    # scores bit for bit. With the split, the tail block's dot continues the first
    # block's accumulator, in the order of the backward's one-block dot. On the
    # interpreter, whose dots the tests make add in order along the head dim
    # (tests/interpreter_like_gpu.py), split and unsplit forwards then give identical
    # outputs and gradients: 40 of 40 seeds in float32 at head dim 96, softmax_scale 2.5.
    # A GPU's dots also add into the accumulator, but that the two agree bit for bit there
    # is unmeasured.
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=warps, num_stages=2,
                SPLIT_HEAD_DIM=False, BLOCK_M_TAIL=0, BLOCK_N_TAIL=0)


def _backward_config(len_q: int, len_k: int, head_dim: int) -> dict:
    """Tile sizes for the backward kernels (BLOCK_M_TAIL / BLOCK_N_TAIL as the forward's)."""
    if interpreter_enabled():
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1,
                    BLOCK_M_TAIL=0, BLOCK_N_TAIL=0)
    block_m = 32 if len_q <= 32 else 64
    block_n = 64
    # Compiled as a launch compiles them (bench/register_report.py; sm90, Triton 3.6),
    # 64 x 64 tiles fit without spills at every BLIP shape with 4 warps (up to 255
    # registers at head dim 88) and with 8 (up to 223): which is faster is for the sweep
    # (bench/sweep_attention_configs.py) on a GPU to say. 8 until then.
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8, num_stages=1,
                BLOCK_M_TAIL=0, BLOCK_N_TAIL=0)


def _check_tails(config: dict) -> dict:
    """``config`` with BLOCK_M_TAIL and BLOCK_N_TAIL filled in (0 when absent), after
    checking each is 0 or a power of 2 from 16 up to its block."""
    config = dict(config)
    for tail, block in (("BLOCK_M_TAIL", "BLOCK_M"), ("BLOCK_N_TAIL", "BLOCK_N")):
        size = config.setdefault(tail, 0)
        if size and (size < 16 or size > config[block] or size & (size - 1)):
            raise ValueError(f"attention config: {tail} must be 0 or a power of 2 from 16 "
                             f"to {block} ({config[block]}), got {size}")
    return config


def _tile_count(length: int, block: int, tail: int) -> int:
    """How many tiles cover ``length``: BLOCK tiles, or with a tail, the whole BLOCK tiles
    and then TAIL tiles (the kernels' ``_full_tiles_end``)."""
    if not tail:
        return cdiv(length, block)
    full = length // block
    return full + cdiv(length - full * block, tail)


def _forward_constants(config: dict, head_dim: int) -> dict:
    """The forward kernel's tile constants and launch options from a config: BLOCK_M,
    BLOCK_N, their tails, num_warps, num_stages, and BLOCK_D / BLOCK_D_TAIL for
    SPLIT_HEAD_DIM."""
    constants = _check_tails(config)
    block_d, block_d_tail = _forward_head_dim_blocks(head_dim,
                                                     constants.pop("SPLIT_HEAD_DIM", False))
    return dict(constants, BLOCK_D=block_d, BLOCK_D_TAIL=block_d_tail)


# The default configs per shape, computed once: a launch costs microseconds of Python,
# which bound the short text shapes. Keyed on whether the interpreter runs (its configs
# differ); callers must not mutate the returned dicts.


@functools.lru_cache(maxsize=1024)
def _default_forward_constants(len_q: int, len_k: int, head_dim: int,
                               interpreter: bool) -> dict:
    return _forward_constants(_forward_config(len_q, len_k, head_dim), head_dim)


@functools.lru_cache(maxsize=1024)
def _default_backward_config(len_q: int, len_k: int, head_dim: int, interpreter: bool) -> dict:
    return _check_tails(_backward_config(len_q, len_k, head_dim))


# --------------------------------------------------------------------------------------
# Kernel helpers (plain @triton.jit functions: Triton inlines them into the kernels)
# --------------------------------------------------------------------------------------


@triton.jit
def _split_batch_head(batch_head, num_heads):
    """Split a program's batch * head index into (batch, head), both int64."""
    return (batch_head // num_heads).to(tl.int64), (batch_head % num_heads).to(tl.int64)


@triton.jit
def _query_program(num_heads, KvIndex, HAS_KV_INDEX: tl.constexpr):
    """Program ids of a query-block kernel: (block_m, batch_head, batch, head, key_batch)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = _split_batch_head(batch_head, num_heads)
    if HAS_KV_INDEX:
        key_batch = tl.load(KvIndex + batch).to(tl.int64)
    else:
        key_batch = batch  # k and v share the query batch rows
    return block_m, batch_head, batch, head, key_batch


@triton.jit
def _block_range(start, SIZE: tl.constexpr, length):
    """Sequence indices ``start + [0, SIZE)`` and which of them are below ``length``."""
    indices = start + tl.arange(0, SIZE)
    return indices, indices < length


@triton.jit
def _head_dim_range(BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Head-dim indices ``[0, BLOCK_D)`` and which of them are below ``HEAD_DIM``."""
    dims = tl.arange(0, BLOCK_D)
    return dims, dims < HEAD_DIM


# Every pointer into a (B, L, H, D) tensor is made by _slice_start and _tile_pointers.
# The batch, length and head strides are multiples of MULTIPLE (the launcher's
# STRIDE_MULTIPLE, ``blipfast.kernels._alignment``), which they show the compiler: with
# it, a tile of a head dim like 88 loads 16 bytes per instruction instead of one element.


@triton.jit
def _slice_start(T, batch, head, stride_b, stride_h, MULTIPLE: tl.constexpr):
    """Pointer to the (batch, head) slice of a (B, L, H, D) tensor."""
    return T + batch * known_multiple(stride_b, MULTIPLE) \
        + head * known_multiple(stride_h, MULTIPLE)


@triton.jit
def _tile_pointers(slice_start, rows, dims, stride_l, stride_d, MULTIPLE: tl.constexpr):
    """Pointers to the [rows, dims] tile of a (batch, head) slice."""
    return slice_start + rows[:, None] * known_multiple(stride_l, MULTIPLE) \
        + dims[None, :] * stride_d


@triton.jit
def _load_tile(T, batch, head, rows, dims, stride_b, stride_l, stride_h, stride_d,
               MULTIPLE: tl.constexpr, mask):
    """Load the [rows, dims] tile of the (batch, head) slice of T, 0 where masked."""
    slice_start = _slice_start(T, batch, head, stride_b, stride_h, MULTIPLE)
    return tl.load(_tile_pointers(slice_start, rows, dims, stride_l, stride_d, MULTIPLE),
                   mask=mask, other=0.0)


@triton.jit
def _store_tile(T, batch, head, rows, dims, stride_b, stride_l, stride_h, stride_d,
                MULTIPLE: tl.constexpr, value, mask):
    """Store ``value``, cast to T's dtype, into the [rows, dims] tile of a (batch, head) slice."""
    slice_start = _slice_start(T, batch, head, stride_b, stride_h, MULTIPLE)
    tl.store(_tile_pointers(slice_start, rows, dims, stride_l, stride_d, MULTIPLE),
             value.to(T.dtype.element_ty), mask=mask)


# A sequence axis (queries or keys) is cut into tiles of BLOCK; with a TAIL (a power of 2
# from 16 up to BLOCK; 0 = none), only whole BLOCK tiles are BLOCK long and what is left
# is cut into TAIL tiles. BLIP's lengths are one past a multiple of 64 (577 = 9 * 64 + 1 image
# tokens with CLS, 257 for ViT-g and the Q-Former's keys), so a 16-long tail computes 16
# rows or keys for the last one instead of 64. Full tiles also skip the length checks.
# The launcher counts the tiles (``_tile_count``); the kernels find them by these helpers.


@triton.jit
def _full_tiles_end(start, end, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Where the whole BLOCK tiles of [start, end) stop; TAIL tiles cover the rest. Without
    a TAIL, ``end``: BLOCK tiles cover it all, the last one possibly cut short."""
    if TAIL == 0:
        full_end = end
    else:
        full_end = start + (end - start) // BLOCK * BLOCK
    return full_end


@triton.jit
def _key_loop_end(row_start, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Where the key loop of the query rows [row_start, row_start + BLOCK_M) stops: len_k,
    or their last causally visible key + 1."""
    end_n = len_k
    if CAUSAL:
        end_n = tl.minimum(len_k, row_start + BLOCK_M + (len_k - len_q))
    return end_n


@triton.jit
def _score_validity(
    rows, cols, key_mask_row_ptr, stride_mask_l, len_q, len_k,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, FULL_KEYS: tl.constexpr,
):
    """Which (query, key) pairs may attend, broadcast from query indices ``rows`` and key
    indices ``cols`` (shaped [M, 1] and [1, N], or [1, M] and [N, 1] for a transposed tile).
    FULL_KEYS: every key index is below len_k (a whole tile), so that is not checked.
    Callers must not call it when nothing is masked (FULL_KEYS, not CAUSAL, no key mask).
    """
    if FULL_KEYS:
        valid = cols >= 0
    else:
        valid = cols < len_k
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_row_ptr + cols * stride_mask_l, mask=valid, other=0)
        valid = valid & (keep != 0)
    if CAUSAL:
        valid = valid & (cols <= rows + (len_k - len_q))
    return valid


@triton.jit
def _key_tile_mask(cols, dim_in, len_k, FULL_KEYS: tl.constexpr):
    """Load mask of a [cols, dims] key tile: the head-dim bound, and the length bound
    unless the tile is whole."""
    if FULL_KEYS:
        mask = dim_in[None, :]
    else:
        mask = (cols < len_k)[:, None] & dim_in[None, :]
    return mask


@triton.jit
def _row_delta(grad_out, out):
    """delta = rowsum(dO * O) in float32, the softmax backward's per-query-row term."""
    return tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, LogSumExp, KeyMask, KvIndex,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_mask_b, stride_mask_l,
    num_heads, len_q, len_k, scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M_TAIL: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D_TAIL: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    # One program per query tile: BLOCK_M rows, or BLOCK_M_TAIL rows past the whole tiles.
    program, batch_head, batch, head, key_batch = _query_program(num_heads, KvIndex, HAS_KV_INDEX)
    full_tiles = _full_tiles_end(0, len_q, BLOCK_M, BLOCK_M_TAIL) // BLOCK_M
    if BLOCK_M_TAIL == 0 or program < full_tiles:
        _attention_forward_rows(
            Q, K, V, Out, LogSumExp, KeyMask,
            stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh,
            stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol,
            stride_oh, stride_od, stride_mask_b, stride_mask_l,
            batch, head, key_batch, batch_head, program * BLOCK_M, len_q, len_k, scale_log2,
            CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_N_TAIL,
            BLOCK_D, BLOCK_D_TAIL, STRIDE_MULTIPLE)
    else:
        _attention_forward_rows(
            Q, K, V, Out, LogSumExp, KeyMask,
            stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh,
            stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol,
            stride_oh, stride_od, stride_mask_b, stride_mask_l,
            batch, head, key_batch, batch_head,
            full_tiles * BLOCK_M + (program - full_tiles) * BLOCK_M_TAIL, len_q, len_k,
            scale_log2, CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HEAD_DIM, BLOCK_M_TAIL, BLOCK_N,
            BLOCK_N_TAIL, BLOCK_D, BLOCK_D_TAIL, STRIDE_MULTIPLE)


@triton.jit
def _attention_forward_rows(
    Q, K, V, Out, LogSumExp, KeyMask,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_mask_b, stride_mask_l,
    batch, head, key_batch, batch_head, row_start, len_q, len_k, scale_log2,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr,
    STRIDE_MULTIPLE: tl.constexpr,
):
    """Attention of the query rows [row_start, row_start + BLOCK_M): online softmax over
    the key tiles, then the output and log-sum-exp stored.

    The head dim is one block [0, BLOCK_D), or with BLOCK_D_TAIL > 0 two blocks,
    [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D_TAIL), whose products are summed (less
    padding than one power-of-2 block, e.g. 64 + 32 for head dim 88)."""
    rows, row_in = _block_range(row_start, BLOCK_M, len_q)
    dims, dim_in = _head_dim_range(BLOCK_D, HEAD_DIM)
    tile_in = row_in[:, None] & dim_in[None, :]
    q = _load_tile(Q, batch, head, rows, dims, stride_qb, stride_ql, stride_qh, stride_qd,
                   STRIDE_MULTIPLE, tile_in)
    k_start = _slice_start(K, key_batch, head, stride_kb, stride_kh, STRIDE_MULTIPLE)
    v_start = _slice_start(V, key_batch, head, stride_vb, stride_vh, STRIDE_MULTIPLE)
    mask_row = KeyMask + key_batch * stride_mask_b

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D_TAIL > 0:
        tail_dims, tail_dim_in = _block_range(BLOCK_D, BLOCK_D_TAIL, HEAD_DIM)
        tail_tile_in = row_in[:, None] & tail_dim_in[None, :]
        q_tail = _load_tile(Q, batch, head, rows, tail_dims,
                            stride_qb, stride_ql, stride_qh, stride_qd, STRIDE_MULTIPLE,
                            tail_tile_in)
        acc_tail = tl.zeros([BLOCK_M, BLOCK_D_TAIL], dtype=tl.float32)
    else:  # placeholders, never read
        tail_dims, tail_dim_in, q_tail, acc_tail = dims, dim_in, q, acc

    end_n = _key_loop_end(row_start, len_q, len_k, CAUSAL, BLOCK_M)
    full_end = _full_tiles_end(0, end_n, BLOCK_N, BLOCK_N_TAIL)
    for start_n in range(0, full_end, BLOCK_N):
        row_max, row_sum, acc, acc_tail = _forward_key_tile(
            q, q_tail, acc, acc_tail, row_max, row_sum, rows, start_n,
            k_start, v_start, stride_kl, stride_kd, stride_vl, stride_vd,
            mask_row, stride_mask_l, len_q, len_k, scale_log2,
            dims, dim_in, tail_dims, tail_dim_in,
            CAUSAL, HAS_KEY_MASK, DOT_PRECISION, BLOCK_N, BLOCK_D_TAIL, BLOCK_N_TAIL > 0,
            STRIDE_MULTIPLE)
    if BLOCK_N_TAIL > 0:
        for start_n in range(full_end, end_n, BLOCK_N_TAIL):
            row_max, row_sum, acc, acc_tail = _forward_key_tile(
                q, q_tail, acc, acc_tail, row_max, row_sum, rows, start_n,
                k_start, v_start, stride_kl, stride_kd, stride_vl, stride_vd,
                mask_row, stride_mask_l, len_q, len_k, scale_log2,
                dims, dim_in, tail_dims, tail_dim_in,
                CAUSAL, HAS_KEY_MASK, DOT_PRECISION, BLOCK_N_TAIL, BLOCK_D_TAIL, False,
                STRIDE_MULTIPLE)

    has_keys = row_sum > 0.0
    inverse_sum = tl.where(has_keys, 1.0 / tl.where(has_keys, row_sum, 1.0), 0.0)
    log_sum_exp = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)),
                           float("inf"))
    _store_tile(Out, batch, head, rows, dims, stride_ob, stride_ol, stride_oh, stride_od,
                STRIDE_MULTIPLE, acc * inverse_sum[:, None], tile_in)
    if BLOCK_D_TAIL > 0:
        _store_tile(Out, batch, head, rows, tail_dims, stride_ob, stride_ol, stride_oh,
                    stride_od, STRIDE_MULTIPLE, acc_tail * inverse_sum[:, None], tail_tile_in)
    tl.store(LogSumExp + batch_head.to(tl.int64) * len_q + rows, log_sum_exp, mask=row_in)


@triton.jit
def _forward_key_tile(
    q, q_tail, acc, acc_tail, row_max, row_sum, rows, start_n,
    k_start, v_start, stride_kl, stride_kd, stride_vl, stride_vd,
    mask_row, stride_mask_l, len_q, len_k, scale_log2,
    dims, dim_in, tail_dims, tail_dim_in,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D_TAIL: tl.constexpr, FULL_KEYS: tl.constexpr,
    STRIDE_MULTIPLE: tl.constexpr,
):
    """One step of the online softmax: the keys [start_n, start_n + BLOCK_N) folded into
    (row_max, row_sum, acc, acc_tail), which it returns. FULL_KEYS: all below len_k."""
    cols = start_n + tl.arange(0, BLOCK_N)
    key_tile_in = _key_tile_mask(cols, dim_in, len_k, FULL_KEYS)
    k = tl.load(_tile_pointers(k_start, cols, dims, stride_kl, stride_kd, STRIDE_MULTIPLE),
                mask=key_tile_in, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        key_tail_in = _key_tile_mask(cols, tail_dim_in, len_k, FULL_KEYS)
        k_tail = tl.load(_tile_pointers(k_start, cols, tail_dims, stride_kl, stride_kd,
                                        STRIDE_MULTIPLE),
                         mask=key_tail_in, other=0.0)
        scores = tl.dot(q_tail, tl.trans(k_tail), scores, input_precision=DOT_PRECISION)
    scores = scores * scale_log2
    if FULL_KEYS and not CAUSAL and not HAS_KEY_MASK:
        # Every score counts, so the new maximum is finite.
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        safe_max = new_max
    else:
        valid = _score_validity(rows[:, None], cols[None, :], mask_row, stride_mask_l, len_q,
                                len_k, CAUSAL, HAS_KEY_MASK, FULL_KEYS)
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # Rows with no valid key so far keep a max of -inf; subtract 0 for them instead
        # so that exp2 sees -inf (giving 0) rather than NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    correction = tl.exp2(row_max - safe_max)
    probs = tl.exp2(scores - safe_max[:, None])
    row_sum = row_sum * correction + tl.sum(probs, 1)
    v = tl.load(_tile_pointers(v_start, cols, dims, stride_vl, stride_vd, STRIDE_MULTIPLE),
                mask=key_tile_in, other=0.0)
    acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        v_tail = tl.load(_tile_pointers(v_start, cols, tail_dims, stride_vl, stride_vd,
                                        STRIDE_MULTIPLE),
                         mask=key_tail_in, other=0.0)
        acc_tail = acc_tail * correction[:, None] + tl.dot(
            probs.to(v_tail.dtype), v_tail, input_precision=DOT_PRECISION)
    return new_max, row_sum, acc, acc_tail


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, Out, GradOut, GradQ, LogSumExp, Delta, KeyMask, KvIndex,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_gob, stride_gol, stride_goh, stride_god,
    stride_gqb, stride_gql, stride_gqh, stride_gqd,
    stride_mask_b, stride_mask_l,
    num_heads, len_q, len_k, scale_log2, scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M_TAIL: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    # One program per query tile, as the forward's.
    program, batch_head, batch, head, key_batch = _query_program(num_heads, KvIndex, HAS_KV_INDEX)
    full_tiles = _full_tiles_end(0, len_q, BLOCK_M, BLOCK_M_TAIL) // BLOCK_M
    if BLOCK_M_TAIL == 0 or program < full_tiles:
        _attention_backward_dq_rows(
            Q, K, V, Out, GradOut, GradQ, LogSumExp, Delta, KeyMask,
            stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh,
            stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol,
            stride_oh, stride_od, stride_gob, stride_gol, stride_goh, stride_god,
            stride_gqb, stride_gql, stride_gqh, stride_gqd, stride_mask_b, stride_mask_l,
            batch, head, key_batch, batch_head, program * BLOCK_M, len_q, len_k, scale_log2,
            scale, CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_N_TAIL, BLOCK_D, STRIDE_MULTIPLE)
    else:
        _attention_backward_dq_rows(
            Q, K, V, Out, GradOut, GradQ, LogSumExp, Delta, KeyMask,
            stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh,
            stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol,
            stride_oh, stride_od, stride_gob, stride_gol, stride_goh, stride_god,
            stride_gqb, stride_gql, stride_gqh, stride_gqd, stride_mask_b, stride_mask_l,
            batch, head, key_batch, batch_head,
            full_tiles * BLOCK_M + (program - full_tiles) * BLOCK_M_TAIL, len_q, len_k,
            scale_log2, scale, CAUSAL, HAS_KEY_MASK, DOT_PRECISION, HEAD_DIM, BLOCK_M_TAIL,
            BLOCK_N, BLOCK_N_TAIL, BLOCK_D, STRIDE_MULTIPLE)


@triton.jit
def _attention_backward_dq_rows(
    Q, K, V, Out, GradOut, GradQ, LogSumExp, Delta, KeyMask,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_gob, stride_gol, stride_goh, stride_god,
    stride_gqb, stride_gql, stride_gqh, stride_gqd,
    stride_mask_b, stride_mask_l,
    batch, head, key_batch, batch_head, row_start, len_q, len_k, scale_log2, scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    """delta and dQ of the query rows [row_start, row_start + BLOCK_M), looping over the
    key tiles."""
    rows, row_in = _block_range(row_start, BLOCK_M, len_q)
    dims, dim_in = _head_dim_range(BLOCK_D, HEAD_DIM)
    tile_in = row_in[:, None] & dim_in[None, :]

    q = _load_tile(Q, batch, head, rows, dims, stride_qb, stride_ql, stride_qh, stride_qd,
                   STRIDE_MULTIPLE, tile_in)
    grad_out = _load_tile(GradOut, batch, head, rows, dims,
                          stride_gob, stride_gol, stride_goh, stride_god, STRIDE_MULTIPLE, tile_in)
    out = _load_tile(Out, batch, head, rows, dims,
                     stride_ob, stride_ol, stride_oh, stride_od, STRIDE_MULTIPLE, tile_in)
    delta = _row_delta(grad_out, out)
    row_stats = batch_head.to(tl.int64) * len_q + rows
    tl.store(Delta + row_stats, delta, mask=row_in)
    log_sum_exp = tl.load(LogSumExp + row_stats, mask=row_in, other=float("inf"))

    k_start = _slice_start(K, key_batch, head, stride_kb, stride_kh, STRIDE_MULTIPLE)
    v_start = _slice_start(V, key_batch, head, stride_vb, stride_vh, STRIDE_MULTIPLE)
    mask_row = KeyMask + key_batch * stride_mask_b
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = _key_loop_end(row_start, len_q, len_k, CAUSAL, BLOCK_M)
    full_end = _full_tiles_end(0, end_n, BLOCK_N, BLOCK_N_TAIL)
    for start_n in range(0, full_end, BLOCK_N):
        grad_q = _dq_key_tile(
            q, grad_out, grad_q, log_sum_exp, delta, rows, start_n,
            k_start, v_start, stride_kl, stride_kd, stride_vl, stride_vd,
            mask_row, stride_mask_l, len_q, len_k, scale_log2, dims, dim_in,
            CAUSAL, HAS_KEY_MASK, DOT_PRECISION, BLOCK_N, BLOCK_N_TAIL > 0, STRIDE_MULTIPLE)
    if BLOCK_N_TAIL > 0:
        for start_n in range(full_end, end_n, BLOCK_N_TAIL):
            grad_q = _dq_key_tile(
                q, grad_out, grad_q, log_sum_exp, delta, rows, start_n,
                k_start, v_start, stride_kl, stride_kd, stride_vl, stride_vd,
                mask_row, stride_mask_l, len_q, len_k, scale_log2, dims, dim_in,
                CAUSAL, HAS_KEY_MASK, DOT_PRECISION, BLOCK_N_TAIL, False, STRIDE_MULTIPLE)

    _store_tile(GradQ, batch, head, rows, dims, stride_gqb, stride_gql, stride_gqh, stride_gqd,
                STRIDE_MULTIPLE, grad_q * scale, tile_in)


@triton.jit
def _dq_key_tile(
    q, grad_out, grad_q, log_sum_exp, delta, rows, start_n,
    k_start, v_start, stride_kl, stride_kd, stride_vl, stride_vd,
    mask_row, stride_mask_l, len_q, len_k, scale_log2, dims, dim_in,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, FULL_KEYS: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    """grad_q plus the keys [start_n, start_n + BLOCK_N)'s part of it (unscaled)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    key_tile_in = _key_tile_mask(cols, dim_in, len_k, FULL_KEYS)
    k = tl.load(_tile_pointers(k_start, cols, dims, stride_kl, stride_kd, STRIDE_MULTIPLE),
                mask=key_tile_in, other=0.0)
    v = tl.load(_tile_pointers(v_start, cols, dims, stride_vl, stride_vd, STRIDE_MULTIPLE),
                mask=key_tile_in, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    probs = tl.exp2(scores - log_sum_exp[:, None])
    if not (FULL_KEYS and not CAUSAL and not HAS_KEY_MASK):
        valid = _score_validity(rows[:, None], cols[None, :], mask_row, stride_mask_l, len_q,
                                len_k, CAUSAL, HAS_KEY_MASK, FULL_KEYS)
        probs = tl.where(valid, probs, 0.0)
    grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
    grad_scores = probs * (grad_probs - delta[:, None])
    return grad_q + tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, Out, GradOut, GradQ, GradK, GradV, LogSumExp, Delta, KeyMask,
    QueryBatchOrder, QueryBatchOffsets,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_gob, stride_gol, stride_goh, stride_god,
    stride_gqb, stride_gql, stride_gqh, stride_gqd,
    stride_gkb, stride_gkl, stride_gkh, stride_gkd,
    stride_gvb, stride_gvl, stride_gvh, stride_gvd,
    stride_mask_b, stride_mask_l,
    num_heads, len_q, len_k, scale_log2, scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    SINGLE_KEY_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M_TAIL: tl.constexpr,
    BLOCK_N_TAIL: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    # One program per key tile: BLOCK_N keys, or BLOCK_N_TAIL keys past the whole tiles.
    program = tl.program_id(0)
    key_batch, head = _split_batch_head(tl.program_id(1), num_heads)
    full_tiles = _full_tiles_end(0, len_k, BLOCK_N, BLOCK_N_TAIL) // BLOCK_N
    if BLOCK_N_TAIL == 0 or program < full_tiles:
        _attention_backward_dkdv_keys(
            Q, K, V, Out, GradOut, GradQ, GradK, GradV, LogSumExp, Delta, KeyMask,
            QueryBatchOrder, QueryBatchOffsets,
            stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh,
            stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol,
            stride_oh, stride_od, stride_gob, stride_gol, stride_goh, stride_god,
            stride_gqb, stride_gql, stride_gqh, stride_gqd, stride_gkb, stride_gkl,
            stride_gkh, stride_gkd, stride_gvb, stride_gvl, stride_gvh, stride_gvd,
            stride_mask_b, stride_mask_l,
            key_batch, head, program * BLOCK_N, num_heads, len_q, len_k, scale_log2, scale,
            CAUSAL, HAS_KEY_MASK, HAS_KV_INDEX, SINGLE_KEY_BLOCK, DOT_PRECISION, HEAD_DIM,
            BLOCK_M, BLOCK_M_TAIL, BLOCK_N, BLOCK_N_TAIL > 0, BLOCK_D, STRIDE_MULTIPLE)
    else:
        _attention_backward_dkdv_keys(
            Q, K, V, Out, GradOut, GradQ, GradK, GradV, LogSumExp, Delta, KeyMask,
            QueryBatchOrder, QueryBatchOffsets,
            stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh,
            stride_kd, stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol,
            stride_oh, stride_od, stride_gob, stride_gol, stride_goh, stride_god,
            stride_gqb, stride_gql, stride_gqh, stride_gqd, stride_gkb, stride_gkl,
            stride_gkh, stride_gkd, stride_gvb, stride_gvl, stride_gvh, stride_gvd,
            stride_mask_b, stride_mask_l,
            key_batch, head, full_tiles * BLOCK_N + (program - full_tiles) * BLOCK_N_TAIL,
            num_heads, len_q, len_k, scale_log2, scale,
            CAUSAL, HAS_KEY_MASK, HAS_KV_INDEX, SINGLE_KEY_BLOCK, DOT_PRECISION, HEAD_DIM,
            BLOCK_M, BLOCK_M_TAIL, BLOCK_N_TAIL, False, BLOCK_D, STRIDE_MULTIPLE)


@triton.jit
def _attention_backward_dkdv_keys(
    Q, K, V, Out, GradOut, GradQ, GradK, GradV, LogSumExp, Delta, KeyMask,
    QueryBatchOrder, QueryBatchOffsets,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_gob, stride_gol, stride_goh, stride_god,
    stride_gqb, stride_gql, stride_gqh, stride_gqd,
    stride_gkb, stride_gkl, stride_gkh, stride_gkd,
    stride_gvb, stride_gvl, stride_gvh, stride_gvd,
    stride_mask_b, stride_mask_l,
    key_batch, head, col_start, num_heads, len_q, len_k, scale_log2, scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    SINGLE_KEY_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    """dK and dV of the keys [col_start, col_start + BLOCK_N) of one key batch and head:
    a loop over every query batch row that reads them and its query tiles, accumulating in
    registers (deterministic, no atomics). SINGLE_KEY_BLOCK: these are all the keys, so it
    also computes delta and writes dQ. FULL_KEYS: all below len_k."""
    cols, col_in = _block_range(col_start, BLOCK_N, len_k)
    dims, dim_in = _head_dim_range(BLOCK_D, HEAD_DIM)
    key_tile_in = col_in[:, None] & dim_in[None, :]

    k = _load_tile(K, key_batch, head, cols, dims,
                   stride_kb, stride_kl, stride_kh, stride_kd, STRIDE_MULTIPLE, key_tile_in)
    v = _load_tile(V, key_batch, head, cols, dims,
                   stride_vb, stride_vl, stride_vh, stride_vd, STRIDE_MULTIPLE, key_tile_in)
    mask_row = KeyMask + key_batch * stride_mask_b
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The query batch rows that read this key batch: itself, or a segment of the
    # kv_index order.
    if HAS_KV_INDEX:
        segment_start = tl.load(QueryBatchOffsets + key_batch)
        segment_end = tl.load(QueryBatchOffsets + key_batch + 1)
    else:
        segment_start = key_batch
        segment_end = key_batch + 1
    # With causal masking, queries before this one cannot see any key of this tile. The
    # single-key-block path writes dQ, so it visits every query row.
    start_m = 0
    if CAUSAL and not SINGLE_KEY_BLOCK:
        start_m = tl.maximum(col_start - (len_k - len_q), 0) // BLOCK_M * BLOCK_M
    full_end = _full_tiles_end(start_m, len_q, BLOCK_M, BLOCK_M_TAIL)

    for segment in range(segment_start, segment_end):
        if HAS_KV_INDEX:
            batch = tl.load(QueryBatchOrder + segment).to(tl.int64)
        else:
            batch = key_batch  # the loop runs once
        for row_start in range(start_m, full_end, BLOCK_M):
            grad_k, grad_v = _dkdv_query_tile(
                Q, Out, GradOut, GradQ, LogSumExp, Delta,
                stride_qb, stride_ql, stride_qh, stride_qd, stride_ob, stride_ol, stride_oh,
                stride_od, stride_gob, stride_gol, stride_goh, stride_god,
                stride_gqb, stride_gql, stride_gqh, stride_gqd,
                k, v, grad_k, grad_v, cols, dims, dim_in, mask_row, stride_mask_l,
                batch, head, row_start, num_heads, len_q, len_k, scale_log2, scale,
                CAUSAL, HAS_KEY_MASK, SINGLE_KEY_BLOCK, DOT_PRECISION, BLOCK_M, FULL_KEYS,
                STRIDE_MULTIPLE)
        if BLOCK_M_TAIL > 0:
            for row_start in range(full_end, len_q, BLOCK_M_TAIL):
                grad_k, grad_v = _dkdv_query_tile(
                    Q, Out, GradOut, GradQ, LogSumExp, Delta,
                    stride_qb, stride_ql, stride_qh, stride_qd, stride_ob, stride_ol,
                    stride_oh, stride_od, stride_gob, stride_gol, stride_goh, stride_god,
                    stride_gqb, stride_gql, stride_gqh, stride_gqd,
                    k, v, grad_k, grad_v, cols, dims, dim_in, mask_row, stride_mask_l,
                    batch, head, row_start, num_heads, len_q, len_k, scale_log2, scale,
                    CAUSAL, HAS_KEY_MASK, SINGLE_KEY_BLOCK, DOT_PRECISION, BLOCK_M_TAIL,
                    FULL_KEYS, STRIDE_MULTIPLE)

    _store_tile(GradK, key_batch, head, cols, dims, stride_gkb, stride_gkl, stride_gkh, stride_gkd,
                STRIDE_MULTIPLE, grad_k * scale, key_tile_in)
    _store_tile(GradV, key_batch, head, cols, dims, stride_gvb, stride_gvl, stride_gvh, stride_gvd,
                STRIDE_MULTIPLE, grad_v, key_tile_in)


@triton.jit
def _dkdv_query_tile(
    Q, Out, GradOut, GradQ, LogSumExp, Delta,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_gob, stride_gol, stride_goh, stride_god,
    stride_gqb, stride_gql, stride_gqh, stride_gqd,
    k, v, grad_k, grad_v, cols, dims, dim_in, mask_row, stride_mask_l,
    batch, head, row_start, num_heads, len_q, len_k, scale_log2, scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SINGLE_KEY_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, FULL_KEYS: tl.constexpr,
    STRIDE_MULTIPLE: tl.constexpr,
):
    """(grad_k, grad_v) plus the query rows [row_start, row_start + BLOCK_M) of query batch
    row ``batch``'s part of them (grad_k unscaled); with SINGLE_KEY_BLOCK also their dQ,
    stored."""
    rows, row_in = _block_range(row_start, BLOCK_M, len_q)
    tile_in = row_in[:, None] & dim_in[None, :]
    q = _load_tile(Q, batch, head, rows, dims,
                   stride_qb, stride_ql, stride_qh, stride_qd, STRIDE_MULTIPLE, tile_in)
    grad_out = _load_tile(GradOut, batch, head, rows, dims,
                          stride_gob, stride_gol, stride_goh, stride_god, STRIDE_MULTIPLE,
                          tile_in)
    row_stats = (batch * num_heads + head) * len_q + rows
    log_sum_exp = tl.load(LogSumExp + row_stats, mask=row_in, other=float("inf"))
    if SINGLE_KEY_BLOCK:
        out = _load_tile(Out, batch, head, rows, dims,
                         stride_ob, stride_ol, stride_oh, stride_od, STRIDE_MULTIPLE, tile_in)
        delta = _row_delta(grad_out, out)
    else:
        delta = tl.load(Delta + row_stats, mask=row_in, other=0.0)

    # Transposed tiles [keys, queries] so that dK and dV need no transpose. Query rows
    # past len_q have log-sum-exp +inf, so probability 0.
    scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
    probs_t = tl.exp2(scores_t - log_sum_exp[None, :])
    if not (FULL_KEYS and not CAUSAL and not HAS_KEY_MASK):
        valid_t = _score_validity(rows[None, :], cols[:, None], mask_row, stride_mask_l,
                                  len_q, len_k, CAUSAL, HAS_KEY_MASK, FULL_KEYS)
        probs_t = tl.where(valid_t, probs_t, 0.0)
    grad_v += tl.dot(probs_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
    grad_probs_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
    grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
    grad_k += tl.dot(grad_scores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    if SINGLE_KEY_BLOCK:
        grad_q = tl.dot(tl.trans(grad_scores_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
        _store_tile(GradQ, batch, head, rows, dims,
                    stride_gqb, stride_gql, stride_gqh, stride_gqd, STRIDE_MULTIPLE,
                    grad_q * scale, tile_in)
    return grad_k, grad_v


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _mask_arguments(key_padding_mask: Optional[torch.Tensor], like: torch.Tensor):
    if key_padding_mask is None:
        return like, 0, 0  # never read: HAS_KEY_MASK is False
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool \
        else key_padding_mask
    return mask, mask.stride(0), mask.stride(1)


def _index_argument(kv_index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """kv_index as the kernels read it: element b at offset b (a strided or expanded view
    is copied; B integers)."""
    return None if kv_index is None else kv_index.contiguous()


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], kv_index: Optional[torch.Tensor],
    causal: bool, softmax_scale: float, config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (out (B, Lq, H, D), log_sum_exp (B, H, Lq) fp32).

    ``config`` overrides the tile sizes (BLOCK_M, BLOCK_N, num_warps, num_stages and
    optionally SPLIT_HEAD_DIM, BLOCK_M_TAIL, BLOCK_N_TAIL); by default
    ``_forward_config`` picks them.
    """
    batch, len_q, num_heads, head_dim = q.shape
    len_k = k.shape[1]
    out = torch.empty((batch, len_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    log_sum_exp = torch.empty((batch, num_heads, len_q), dtype=torch.float32, device=q.device)
    if batch == 0 or len_q == 0 or num_heads == 0:
        return out, log_sum_exp
    mask, stride_mask_b, stride_mask_l = _mask_arguments(key_padding_mask, q)
    kv_index = _index_argument(kv_index)
    if config is None:
        constants = _default_forward_constants(len_q, len_k, head_dim, interpreter_enabled())
    else:
        constants = _forward_constants(config, head_dim)
    grid = (_tile_count(len_q, constants["BLOCK_M"], constants["BLOCK_M_TAIL"]),
            batch * num_heads)
    _attention_forward_kernel[grid](
        q, k, v, out, log_sum_exp, mask, kv_index if kv_index is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_mask_b, stride_mask_l,
        num_heads, len_q, len_k, softmax_scale * LOG2_E,
        CAUSAL=causal, HAS_KEY_MASK=key_padding_mask is not None,
        HAS_KV_INDEX=kv_index is not None, DOT_PRECISION=dot_precision(q.dtype),
        HEAD_DIM=head_dim, STRIDE_MULTIPLE=stride_multiple(q, k, v, out), **constants,
    )
    return out, log_sum_exp


def _query_batches_by_key_batch(kv_index: torch.Tensor, key_batch: int):
    """Group query batch rows by the key batch they read, without a host sync.

    Returns (order, offsets): the query rows reading key batch j are
    ``order[offsets[j]:offsets[j + 1]]``.
    """
    order = torch.argsort(kv_index, stable=True).to(torch.int32)
    counts = torch.zeros(key_batch, dtype=torch.int32, device=kv_index.device)
    counts.index_add_(0, kv_index.long(), torch.ones_like(kv_index, dtype=torch.int32))
    offsets = torch.zeros(key_batch + 1, dtype=torch.int32, device=kv_index.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, log_sum_exp: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], kv_index: Optional[torch.Tensor],
    causal: bool, softmax_scale: float, config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Returns (grad_q, grad_k, grad_v) shaped like q, k, v.

    ``config`` overrides the tile sizes; by default ``_backward_config`` picks them.
    """
    batch, len_q, num_heads, head_dim = q.shape
    key_batch, len_k = k.shape[0], k.shape[1]
    grad_q = torch.empty((batch, len_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    grad_k = torch.empty((key_batch, len_k, num_heads, head_dim), dtype=k.dtype, device=k.device)
    grad_v = torch.empty((key_batch, len_k, num_heads, head_dim), dtype=v.dtype, device=v.device)
    if num_heads == 0 or len_k == 0 or key_batch == 0:
        return grad_q.zero_(), grad_k, grad_v
    if batch == 0 or len_q == 0:
        return grad_q, grad_k.zero_(), grad_v.zero_()
    mask, stride_mask_b, stride_mask_l = _mask_arguments(key_padding_mask, q)
    kv_index = _index_argument(kv_index)
    if config is None:
        config = _default_backward_config(len_q, len_k, head_dim, interpreter_enabled())
    else:
        config = _check_tails(config)
    block_d = _block_d(head_dim)
    key_tiles = _tile_count(len_k, config["BLOCK_N"], config["BLOCK_N_TAIL"])
    single_key_block = key_tiles == 1
    common = dict(
        CAUSAL=causal, HAS_KEY_MASK=key_padding_mask is not None,
        HAS_KV_INDEX=kv_index is not None, DOT_PRECISION=dot_precision(q.dtype),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_M_TAIL=config["BLOCK_M_TAIL"], BLOCK_N_TAIL=config["BLOCK_N_TAIL"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        # The gradients are allocated contiguous: their strides are multiples of head_dim.
        STRIDE_MULTIPLE=stride_multiple(q, k, v, out, grad_out, sizes=(head_dim,)),
    )
    # delta = rowsum(dO * O), written by the dQ kernel; the single-key-block dK/dV kernel
    # computes it itself.
    delta = log_sum_exp if single_key_block else torch.empty_like(log_sum_exp)
    if not single_key_block:
        grid = (_tile_count(len_q, config["BLOCK_M"], config["BLOCK_M_TAIL"]),
                batch * num_heads)
        _attention_backward_dq_kernel[grid](
            q, k, v, out, grad_out, grad_q, log_sum_exp, delta, mask,
            kv_index if kv_index is not None else q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
            *grad_q.stride(), stride_mask_b, stride_mask_l,
            num_heads, len_q, len_k, softmax_scale * LOG2_E, softmax_scale,
            **common,
        )
    if kv_index is not None:
        order, offsets = _query_batches_by_key_batch(kv_index, key_batch)
    else:
        order = offsets = q  # never read
    grid = (key_tiles, key_batch * num_heads)
    _attention_backward_dkdv_kernel[grid](
        q, k, v, out, grad_out, grad_q, grad_k, grad_v, log_sum_exp, delta, mask,
        order, offsets,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
        *grad_q.stride(), *grad_k.stride(), *grad_v.stride(), stride_mask_b, stride_mask_l,
        num_heads, len_q, len_k, softmax_scale * LOG2_E, softmax_scale,
        SINGLE_KEY_BLOCK=single_key_block, **common,
    )
    return grad_q, grad_k, grad_v


# --------------------------------------------------------------------------------------
# Autograd and torch.library registration
# --------------------------------------------------------------------------------------
# Two doors to the same launchers: a plain autograd.Function for eager mode (the least
# per-call overhead, which matters for the short text shapes), and a torch.library
# custom op that torch.compile traces as one opaque node.


def _save_for_backward(ctx, q, k, v, key_padding_mask, kv_index, causal, softmax_scale,
                       out, log_sum_exp) -> None:
    ctx.save_for_backward(*savable(q, k, v, out, log_sum_exp, key_padding_mask, kv_index))
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale


class AttentionFunction(torch.autograd.Function):
    """Eager-mode autograd for the fused attention kernels."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, kv_index, causal, softmax_scale):
        out, log_sum_exp = attention_forward(q, k, v, key_padding_mask, kv_index,
                                             causal, softmax_scale)
        _save_for_backward(ctx, q, k, v, key_padding_mask, kv_index, causal, softmax_scale,
                           out, log_sum_exp)
        return out

    @staticmethod
    @first_derivative_only("blipfast.ops.attention")  # a second derivative raises
    def backward(ctx, grad_out):
        q, k, v, out, log_sum_exp, key_padding_mask, kv_index = ctx.saved_tensors
        grad_q, grad_k, grad_v = attention_backward(
            grad_out, q, k, v, out, log_sum_exp, key_padding_mask, kv_index,
            ctx.causal, ctx.softmax_scale)
        return grad_q, grad_k, grad_v, None, None, None, None


@torch.library.custom_op("blipfast::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], kv_index: Optional[torch.Tensor],
    causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.library op: fused attention forward, returning (out, log_sum_exp)."""
    return attention_forward(q, k, v, key_padding_mask, kv_index, causal, softmax_scale)


@attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, key_padding_mask, kv_index, causal, softmax_scale):
    batch, len_q, num_heads, head_dim = q.shape
    return (q.new_empty((batch, len_q, num_heads, head_dim)),
            q.new_empty((batch, num_heads, len_q), dtype=torch.float32))


@torch.library.custom_op("blipfast::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, log_sum_exp: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], kv_index: Optional[torch.Tensor],
    causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.library op: fused attention backward, returning (grad_q, grad_k, grad_v)."""
    return attention_backward(grad_out, q, k, v, out, log_sum_exp, key_padding_mask,
                              kv_index, causal, softmax_scale)


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, log_sum_exp, key_padding_mask,
                             kv_index, causal, softmax_scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _op_setup_context(ctx, inputs, output):
    out, log_sum_exp = output
    ctx.mark_non_differentiable(log_sum_exp)
    q, k, v, key_padding_mask, kv_index, causal, softmax_scale = inputs
    _save_for_backward(ctx, q, k, v, key_padding_mask, kv_index, causal, softmax_scale,
                       out, log_sum_exp)


def _op_backward(ctx, grad_out, grad_log_sum_exp):
    q, k, v, out, log_sum_exp, key_padding_mask, kv_index = ctx.saved_tensors
    grad_q, grad_k, grad_v = attention_backward_op(
        grad_out, q, k, v, out, log_sum_exp, key_padding_mask, kv_index,
        ctx.causal, ctx.softmax_scale)
    return grad_q, grad_k, grad_v, None, None, None, None


attention_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def fused_attention(q, k, v, key_padding_mask, kv_index, causal: bool,
                    softmax_scale: float) -> torch.Tensor:
    """Run the fused kernels with autograd: the custom op under torch.compile, the
    autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return attention_forward_op(q, k, v, key_padding_mask, kv_index, causal,
                                    softmax_scale)[0]
    if not needs_autograd(q, k, v):  # inference, generation: the launcher alone
        return attention_forward(q, k, v, key_padding_mask, kv_index, causal,
                                 softmax_scale)[0]
    return AttentionFunction.apply(q, k, v, key_padding_mask, kv_index, causal,
                                   softmax_scale)
