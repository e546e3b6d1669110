"""Tiled softmax cross-entropy over a similarity matrix that is never stored, in Triton.

This is the engine of the contrastive (ITC) losses. It works on one score matrix

    S[i, j] = logit_scale * max_q  row_feat[i, q] . column_feat[j]        (R x C)

where ``row_feat`` is (R, Q, D) (Q = 1 for plain features; Q > 1 for BLIP-2's Q-Former
query embeddings, where the similarity of an image and a text is the best of its queries)
and ``column_feat`` is (C, D). S is computed tile by tile in registers and thrown away;
nothing of size R x C is ever allocated.

Two cross-entropy terms can be taken over S, each optional:

- the row term: for every row i, ``CE_i = -sum_j T[i, j] log softmax_j S[i, :]``
  with row targets ``T[i, j] = (1 - eps) * (alpha * softmax_j(S_teacher[i, :]) +
  (1 - alpha) * P[i, j] / sum_j P[i, j]) + eps / C``;
- the column term: for every column j, ``CE'_j = -sum_i T'[i, j] log softmax_i S[:, j]``
  with ``T'[i, j] = (1 - eps) * P[i, j] / sum_i P[i, j] + eps / R``.

``P[i, j] = (row_ids[i] == column_ids[j])`` marks the positives, ``eps`` is the label
smoothing, and the optional teacher (momentum distillation, ALBEF/BLIP style) scores
``S_teacher[i, j] = logit_scale * teacher_feat[i] . column_feat[j]`` (no gradient). A row
or column without any positive gets a zero hard target (no NaN); its targets then sum to
less than 1 and its loss is ``-sum_j T log softmax``, as written.

For one GPU's whole batch, image-to-text and text-to-image losses are the row and the
column term of the same matrix, so both come from one forward pass pair and one backward
pass pair. Across GPUs, the caller runs two problems (local rows x all columns, all rows
x local columns).

Kernels:
- ``_row_stats_kernel``: one program per row block, streams column blocks with online
  log-sum-exp; per row it stores the log-sum-exp (as the row's largest score and the log
  of its sum of exponentials, see ``ROW_STATS``), ``sum_j T S``, ``sum_j softmax S`` (for
  the logit_scale gradient), the number of positives and the teacher's log-sum-exp.
  Optionally it also draws a hard negative per row (Gumbel-max: the argmax over
  non-positive columns of ``S + Gumbel noise`` is a sample of ``softmax(S)`` restricted
  to the negatives), with Philox counters keyed on global (row, column) indices.
- ``_column_stats_kernel``: the same per column, streaming row blocks.
- ``_row_grad_kernel``: recomputes S per tile and accumulates the row features'
  gradient ``sum_j dS[i, j] column_feat[j]`` (routed to the best query when Q > 1).
- ``_column_grad_kernel``: the column features' gradient ``sum_i dS[i, j] row_feat[i]``.

with ``dS[i, j] = g_i (m_i softmax_j S[i, :] - T[i, j]) + g'_j (m'_j softmax_i S[:, j] -
T'[i, j])`` where g and g' are the incoming gradients of the per-row and per-column losses
and m, m' the targets' sums (1 unless there is no positive). The gradient of logit_scale
needs no extra pass: ``dCE_i / dscale = (m_i sum_j softmax S - sum_j T S) / scale``, from
the stored statistics.

This file knows nothing of models or of torch.distributed; argument checking lives in
``blipfast.ops``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from blipfast.kernels._runtime import (cdiv, dot_precision, interpreter_enabled,
                                      next_power_of_2, savable)

LOG2_E = tl.constexpr(1.4426950408889634)  # a constexpr: usable inside @triton.jit code
LN_2 = 0.6931471805599453  # 1 / LOG2_E, for the launchers

# Rows of the statistics tensors written by the forward kernels. A log-sum-exp is kept in
# two parts: the largest score m, and log2 of the sum of exp(score - m). Softmax
# probabilities are exp2((score - m) * log2(e) - that log2 sum), and a row's loss is
# mass * (m + log2 sum * ln 2) - target_dot, so the largest score cancels exactly (as in
# PyTorch's log_softmax): one stored log-sum-exp, or a maximum taken over scores already
# multiplied by log2(e), is |score| in size (up to logit_scale: 100 for BLIP, 1000 at its
# temperature clamp) and would carry |score| * 6e-8 of rounding into every probability,
# and into the gradient of a confident row (softmax near 1 minus its target), hundreds of
# times PyTorch's own float32 error.
ROW_STATS = ("score_max", "log2_exp_sum", "target_dot", "probability_dot", "positives",
             "teacher_score_max", "teacher_log2_exp_sum")
COLUMN_STATS = ROW_STATS[:5]
_STAT = {name: index for index, name in enumerate(ROW_STATS)}


# --------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------


def _tile_config(queries: int, feature_dim: int) -> dict:
    """Tile sizes: BLOCK_M rows (each with BLOCK_Q query slots) by BLOCK_N columns."""
    block_q = next_power_of_2(queries)
    block_d = max(16, next_power_of_2(feature_dim))
    if interpreter_enabled():
        # Few, mid-sized tiles: the interpreter's cost is per tile operation.
        block_n = 32
        flat_rows = 32
        warps, stages = 4, 1
    else:
        # Chosen so that no kernel spills registers on sm90 (ptxas -v, Triton 3.6, bf16):
        # the row tile stays in registers for the whole column loop, so wide features
        # take narrower column tiles. Not yet tuned by timing on a GPU.
        block_n = 32 if block_d > 128 else 64
        flat_rows = 64
        warps, stages = 8, 2
    # tl.dot needs at least 16 rows: a block of BLOCK_M rows has BLOCK_M * BLOCK_Q of them.
    block_m = max(1, flat_rows // block_q)
    return dict(BLOCK_Q=block_q, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------------
# Shared tile helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_row_tile(row_ptr, row_start, num_rows, stride_row, stride_query, stride_dim,
                   QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                   FEATURE_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row_start, row_start + BLOCK_M) with their query slots, flattened to
    (BLOCK_M * BLOCK_Q, BLOCK_D); missing rows, queries and dims read as 0."""
    flat = tl.arange(0, BLOCK_M * BLOCK_Q)
    rows = row_start + flat // BLOCK_Q
    queries = flat % BLOCK_Q
    dims = tl.arange(0, BLOCK_D)
    pointers = (row_ptr + rows.to(tl.int64)[:, None] * stride_row
                + queries[:, None] * stride_query + dims[None, :] * stride_dim)
    mask = ((rows < num_rows) & (queries < QUERIES))[:, None] & (dims < FEATURE_DIM)[None, :]
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _load_plain_tile(pointer, start, count, stride_item, stride_dim, BLOCK: tl.constexpr,
                     FEATURE_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Items [start, start + BLOCK) of a (count, D) matrix as (BLOCK, BLOCK_D)."""
    items = start + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    pointers = pointer + items.to(tl.int64)[:, None] * stride_item + dims[None, :] * stride_dim
    mask = (items < count)[:, None] & (dims < FEATURE_DIM)[None, :]
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _query_scores(row_tile, column_tile, DOT_PRECISION: tl.constexpr):
    """Per-query dot products, (BLOCK_M * BLOCK_Q, BLOCK_N), float32."""
    return tl.dot(row_tile, tl.trans(column_tile), input_precision=DOT_PRECISION)


@triton.jit
def _per_query(query_scores, QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-query scores as (BLOCK_M, BLOCK_Q, BLOCK_N), -inf in the padding query slots."""
    per_query = tl.reshape(query_scores, (BLOCK_M, BLOCK_Q, BLOCK_N))
    valid_query = (tl.arange(0, BLOCK_Q) < QUERIES)[None, :, None]
    return tl.where(valid_query, per_query, float("-inf"))


@triton.jit
def _best_query_scores(query_scores, QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Similarity of each (row, column): the best of the row's queries, (BLOCK_M, BLOCK_N)."""
    if BLOCK_Q == 1:
        best = query_scores
    else:
        best = tl.max(_per_query(query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N), axis=1)
    return best


@triton.jit
def _route_to_best_query(score_grad, query_scores, QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Send each (row, column) gradient to the query that won the max (first one on ties),
    as (BLOCK_M * BLOCK_Q, BLOCK_N)."""
    if BLOCK_Q == 1:
        routed = score_grad
    else:
        per_query = _per_query(query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N)
        winner = tl.argmax(per_query, axis=1, tie_break_left=True)
        chosen = tl.arange(0, BLOCK_Q)[None, :, None] == winner[:, None, :]
        routed = tl.reshape(tl.where(chosen, score_grad[:, None, :], 0.0),
                            (BLOCK_M * BLOCK_Q, BLOCK_N))
    return routed


@triton.jit
def _gumbel_noise(seed, row_index, column_index, DIRECTION: tl.constexpr):
    """Gumbel(0, 1) noise for each (global row, global column) pair: the same value
    whatever the tiling, the device or the rank that draws it."""
    zero = tl.zeros(row_index.shape, tl.uint32)
    bits, _, _, _ = tl.philox(seed, row_index.to(tl.uint32), column_index.to(tl.uint32),
                              zero + DIRECTION, zero)
    uniform = tl.uint_to_uniform_float(bits)
    return -tl.log(-tl.log(uniform))


@triton.jit
def _online_update(running_max, running_sum, running_dot, scores, valid, weights):
    """One step of an online log-sum-exp over the valid ``scores`` (max in score units,
    exponentials in base 2 of the differences) that also tracks
    ``sum exp(scores - max) * weights``. Returns the new (max, sum, dot)."""
    scores = tl.where(valid, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp2((running_max - safe_max) * LOG2_E)
    probabilities = tl.exp2((scores - safe_max[:, None]) * LOG2_E)
    new_sum = running_sum * rescale + tl.sum(probabilities, axis=1)
    new_dot = running_dot * rescale + tl.sum(probabilities * weights, axis=1)
    return new_max, new_sum, new_dot


@triton.jit
def _hard_target(positive, positive_count):
    """Hard target: 1 / (number of positives) at the positives, 0 elsewhere."""
    return tl.where(positive, 1.0 / tl.maximum(positive_count, 1.0), 0.0)


@triton.jit
def _hard_target_dot(positive_dot, positive_count):
    """Sum of hard targets times scores: the mean score over the positives (0 if none)."""
    return tl.where(positive_count > 0, positive_dot / tl.maximum(positive_count, 1.0), 0.0)


@triton.jit
def _target_mass(positive_count, alpha, label_smoothing):
    """Sum of a row's (or column's) targets: 1, less the hard part when it has no positive."""
    has_positive = (positive_count > 0).to(tl.float32)
    return (1.0 - label_smoothing) * (alpha + (1.0 - alpha) * has_positive) + label_smoothing


# --------------------------------------------------------------------------------------
# Forward: per-row and per-column statistics
# --------------------------------------------------------------------------------------


@triton.jit
def _empty_statistics(SIZE: tl.constexpr):
    """Running statistics of SIZE rows (or columns) before any tile: max and sum for the
    online log-sum-exp, sum of softmax-weighted scores, sum of positive scores, number of
    positives, sum of all scores."""
    zeros = tl.zeros([SIZE], tl.float32)
    return tl.full([SIZE], float("-inf"), tl.float32), zeros, zeros, zeros, zeros, zeros


@triton.jit
def _accumulate_tile(scores, valid, positive, score_max, exp_sum, probability_dot,
                     positive_dot, positive_count, score_sum):
    """Fold one tile of scores, reduced along axis 1, into the running statistics."""
    score_max, exp_sum, probability_dot = _online_update(
        score_max, exp_sum, probability_dot, scores, valid, scores)
    positive_dot += tl.sum(tl.where(positive, scores, 0.0), axis=1)
    positive_count += tl.sum(positive.to(tl.float32), axis=1)
    score_sum += tl.sum(scores, axis=1)
    return score_max, exp_sum, probability_dot, positive_dot, positive_count, score_sum


@triton.jit
def _sample_tile(scores, noise, valid, positive, tile_start, best_key, best_index):
    """Gumbel-max over one tile's non-positives, along axis 1: keep the running winner."""
    keys = tl.where(valid & ~positive, scores + noise, float("-inf"))
    tile_best = tl.max(keys, axis=1)
    tile_index = tl.argmax(keys, axis=1).to(tl.int64) + tile_start
    better = tile_best > best_key
    return tl.where(better, tile_best, best_key), tl.where(better, tile_index, best_index)


@triton.jit
def _safe_sum(exp_sum):
    """The sum of exponentials, 1 where it is 0 (no valid score): a safe divisor and log."""
    return tl.where(exp_sum > 0, exp_sum, 1.0)


@triton.jit
def _store_statistics(stats_ptr, items, count, mask, score_max, safe_sum, target_dot,
                      probability_dot, positive_count):
    """Write the first five statistics rows (see ``ROW_STATS``) of a (K, count) tensor."""
    tl.store(stats_ptr + items, score_max, mask=mask)
    tl.store(stats_ptr + count + items, tl.log2(safe_sum), mask=mask)
    tl.store(stats_ptr + 2 * count + items, target_dot, mask=mask)
    tl.store(stats_ptr + 3 * count + items, probability_dot, mask=mask)
    tl.store(stats_ptr + 4 * count + items, positive_count, mask=mask)


@triton.jit
def _softmax(scores, score_max, log2_exp_sum):
    """Softmax from the stored statistics (see ``ROW_STATS``)."""
    return tl.exp2((scores - score_max) * LOG2_E - log2_exp_sum)


@triton.jit
def _row_stats_kernel(
    row_ptr, column_ptr, teacher_ptr, row_ids_ptr, column_ids_ptr, scale_ptr, seed_ptr,
    stats_ptr, negative_ptr,
    num_rows, num_columns, row_index_offset, column_index_offset,
    stride_row, stride_query, stride_row_dim, stride_column, stride_column_dim,
    stride_teacher, stride_teacher_dim,
    alpha, label_smoothing,
    QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr, FEATURE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DISTILL: tl.constexpr, SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_start = tl.program_id(0) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    scale = tl.load(scale_ptr)
    row_tile = _load_row_tile(row_ptr, row_start, num_rows, stride_row, stride_query,
                              stride_row_dim, QUERIES, BLOCK_Q, BLOCK_M, FEATURE_DIM, BLOCK_D)
    row_ids = tl.load(row_ids_ptr + rows, mask=row_valid, other=0)
    if DISTILL:
        teacher_tile = _load_plain_tile(teacher_ptr, row_start, num_rows, stride_teacher,
                                        stride_teacher_dim, BLOCK_M, FEATURE_DIM, BLOCK_D)
    if SAMPLE:
        seed = tl.load(seed_ptr)

    stats = _empty_statistics(BLOCK_M)
    teacher_max, teacher_sum, teacher_dot, _, _, _ = _empty_statistics(BLOCK_M)
    best_key = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_column = tl.full([BLOCK_M], -1, tl.int64)

    for column_start in range(0, num_columns, BLOCK_N):
        columns = column_start + tl.arange(0, BLOCK_N)
        column_valid = columns < num_columns
        valid = row_valid[:, None] & column_valid[None, :]
        column_tile = _load_plain_tile(column_ptr, column_start, num_columns, stride_column,
                                       stride_column_dim, BLOCK_N, FEATURE_DIM, BLOCK_D)
        query_scores = _query_scores(row_tile, column_tile, DOT_PRECISION)
        scores = _best_query_scores(query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N) * scale
        scores = tl.where(valid, scores, 0.0)
        column_ids = tl.load(column_ids_ptr + columns, mask=column_valid, other=0)
        positive = valid & (row_ids[:, None] == column_ids[None, :])
        stats = _accumulate_tile(scores, valid, positive, *stats)
        if DISTILL:
            teacher_scores = _query_scores(teacher_tile, column_tile, DOT_PRECISION) * scale
            teacher_max, teacher_sum, teacher_dot = _online_update(
                teacher_max, teacher_sum, teacher_dot, teacher_scores, valid, scores)
        if SAMPLE:
            noise = _gumbel_noise(seed, (row_index_offset + rows)[:, None] + 0 * columns[None, :],
                                  (column_index_offset + columns)[None, :] + 0 * rows[:, None], 0)
            best_key, best_column = _sample_tile(scores, noise, valid, positive, column_start,
                                                 best_key, best_column)

    score_max, exp_sum, probability_dot, positive_dot, positive_count, score_sum = stats
    safe_sum = _safe_sum(exp_sum)
    target_dot = _hard_target_dot(positive_dot, positive_count)
    if DISTILL:
        teacher_safe_sum = _safe_sum(teacher_sum)
        target_dot = alpha * (teacher_dot / teacher_safe_sum) + (1.0 - alpha) * target_dot
        tl.store(stats_ptr + 5 * num_rows + rows, teacher_max, mask=row_valid)
        tl.store(stats_ptr + 6 * num_rows + rows, tl.log2(teacher_safe_sum), mask=row_valid)
    else:
        for teacher_row in tl.static_range(5, 7):
            tl.store(stats_ptr + teacher_row * num_rows + rows, tl.zeros([BLOCK_M], tl.float32),
                     mask=row_valid)
    target_dot = (1.0 - label_smoothing) * target_dot + label_smoothing / num_columns * score_sum
    _store_statistics(stats_ptr, rows, num_rows, row_valid, score_max, safe_sum, target_dot,
                      probability_dot / safe_sum, positive_count)
    if SAMPLE:
        tl.store(negative_ptr + rows, best_column + tl.where(best_column >= 0, column_index_offset, 0),
                 mask=row_valid)


@triton.jit
def _column_stats_kernel(
    row_ptr, column_ptr, row_ids_ptr, column_ids_ptr, scale_ptr, seed_ptr,
    stats_ptr, negative_ptr,
    num_rows, num_columns, row_index_offset, column_index_offset,
    stride_row, stride_query, stride_row_dim, stride_column, stride_column_dim,
    label_smoothing,
    QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr, FEATURE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    column_start = tl.program_id(0) * BLOCK_N
    columns = column_start + tl.arange(0, BLOCK_N)
    column_valid = columns < num_columns
    scale = tl.load(scale_ptr)
    column_tile = _load_plain_tile(column_ptr, column_start, num_columns, stride_column,
                                   stride_column_dim, BLOCK_N, FEATURE_DIM, BLOCK_D)
    column_ids = tl.load(column_ids_ptr + columns, mask=column_valid, other=0)
    if SAMPLE:
        seed = tl.load(seed_ptr)

    # Statistics are kept per column; tiles are transposed to (BLOCK_N, BLOCK_M) so the
    # shared helpers reduce along axis 1, as for rows.
    stats = _empty_statistics(BLOCK_N)
    best_key = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_row = tl.full([BLOCK_N], -1, tl.int64)

    for row_start in range(0, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < num_rows
        valid = column_valid[:, None] & row_valid[None, :]
        row_tile = _load_row_tile(row_ptr, row_start, num_rows, stride_row, stride_query,
                                  stride_row_dim, QUERIES, BLOCK_Q, BLOCK_M, FEATURE_DIM, BLOCK_D)
        query_scores = _query_scores(row_tile, column_tile, DOT_PRECISION)
        scores = tl.trans(_best_query_scores(query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N))
        scores = tl.where(valid, scores * scale, 0.0)
        row_ids = tl.load(row_ids_ptr + rows, mask=row_valid, other=0)
        positive = valid & (column_ids[:, None] == row_ids[None, :])
        stats = _accumulate_tile(scores, valid, positive, *stats)
        if SAMPLE:
            noise = _gumbel_noise(seed, (row_index_offset + rows)[None, :] + 0 * columns[:, None],
                                  (column_index_offset + columns)[:, None] + 0 * rows[None, :], 1)
            best_key, best_row = _sample_tile(scores, noise, valid, positive, row_start,
                                              best_key, best_row)

    score_max, exp_sum, probability_dot, positive_dot, positive_count, score_sum = stats
    safe_sum = _safe_sum(exp_sum)
    target_dot = _hard_target_dot(positive_dot, positive_count)
    target_dot = (1.0 - label_smoothing) * target_dot + label_smoothing / num_rows * score_sum
    _store_statistics(stats_ptr, columns, num_columns, column_valid, score_max, safe_sum,
                      target_dot, probability_dot / safe_sum, positive_count)
    if SAMPLE:
        tl.store(negative_ptr + columns, best_row + tl.where(best_row >= 0, row_index_offset, 0),
                 mask=column_valid)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _score_gradient(
    scores, valid, positive, rows, columns, num_rows, num_columns,
    row_stats_ptr, column_stats_ptr, grad_row_loss_ptr, grad_column_loss_ptr, normalizer,
    alpha, label_smoothing, teacher_scores,
    ROW_TERM: tl.constexpr, COLUMN_TERM: tl.constexpr, DISTILL: tl.constexpr,
):
    """dLoss/dS for a (BLOCK_M, BLOCK_N) tile, divided by ``normalizer`` (the largest
    incoming loss gradient) so it stays in the range of half-precision operands."""
    row_valid = rows < num_rows
    column_valid = columns < num_columns
    grad = tl.zeros(scores.shape, tl.float32)
    if ROW_TERM:
        score_max = tl.load(row_stats_ptr + rows, mask=row_valid, other=0.0)
        log2_exp_sum = tl.load(row_stats_ptr + num_rows + rows, mask=row_valid, other=0.0)
        count = tl.load(row_stats_ptr + 4 * num_rows + rows, mask=row_valid, other=1.0)
        weight = tl.load(grad_row_loss_ptr + rows, mask=row_valid, other=0.0) / normalizer
        target = _hard_target(positive, count[:, None])
        if DISTILL:
            teacher_max = tl.load(row_stats_ptr + 5 * num_rows + rows, mask=row_valid, other=0.0)
            teacher_log2_sum = tl.load(row_stats_ptr + 6 * num_rows + rows, mask=row_valid,
                                       other=0.0)
            teacher_probability = _softmax(teacher_scores, teacher_max[:, None],
                                           teacher_log2_sum[:, None])
            target = alpha * teacher_probability + (1.0 - alpha) * target
        target = (1.0 - label_smoothing) * target + label_smoothing / num_columns
        mass = _target_mass(count, alpha if DISTILL else 0.0, label_smoothing)
        probability = _softmax(scores, score_max[:, None], log2_exp_sum[:, None])
        grad += weight[:, None] * (mass[:, None] * probability - target)
    if COLUMN_TERM:
        score_max = tl.load(column_stats_ptr + columns, mask=column_valid, other=0.0)
        log2_exp_sum = tl.load(column_stats_ptr + num_columns + columns, mask=column_valid,
                               other=0.0)
        count = tl.load(column_stats_ptr + 4 * num_columns + columns, mask=column_valid, other=1.0)
        weight = tl.load(grad_column_loss_ptr + columns, mask=column_valid, other=0.0) / normalizer
        target = _hard_target(positive, count[None, :])
        target = (1.0 - label_smoothing) * target + label_smoothing / num_rows
        mass = _target_mass(count, 0.0, label_smoothing)
        probability = _softmax(scores, score_max[None, :], log2_exp_sum[None, :])
        grad += weight[None, :] * (mass[None, :] * probability - target)
    return tl.where(valid, grad, 0.0)


@triton.jit
def _row_grad_kernel(
    row_ptr, column_ptr, teacher_ptr, row_ids_ptr, column_ids_ptr, scale_ptr,
    row_stats_ptr, column_stats_ptr, grad_row_loss_ptr, grad_column_loss_ptr, normalizer_ptr,
    grad_row_ptr,
    num_rows, num_columns,
    stride_row, stride_query, stride_row_dim, stride_column, stride_column_dim,
    stride_teacher, stride_teacher_dim,
    alpha, label_smoothing,
    QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr, FEATURE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_TERM: tl.constexpr, COLUMN_TERM: tl.constexpr, DISTILL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row_start = tl.program_id(0) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    scale = tl.load(scale_ptr)
    normalizer = tl.load(normalizer_ptr)
    row_tile = _load_row_tile(row_ptr, row_start, num_rows, stride_row, stride_query,
                              stride_row_dim, QUERIES, BLOCK_Q, BLOCK_M, FEATURE_DIM, BLOCK_D)
    row_ids = tl.load(row_ids_ptr + rows, mask=row_valid, other=0)
    if DISTILL:
        teacher_tile = _load_plain_tile(teacher_ptr, row_start, num_rows, stride_teacher,
                                        stride_teacher_dim, BLOCK_M, FEATURE_DIM, BLOCK_D)
    accumulator = tl.zeros([BLOCK_M * BLOCK_Q, BLOCK_D], tl.float32)

    for column_start in range(0, num_columns, BLOCK_N):
        columns = column_start + tl.arange(0, BLOCK_N)
        column_valid = columns < num_columns
        valid = row_valid[:, None] & column_valid[None, :]
        column_tile = _load_plain_tile(column_ptr, column_start, num_columns, stride_column,
                                       stride_column_dim, BLOCK_N, FEATURE_DIM, BLOCK_D)
        query_scores = _query_scores(row_tile, column_tile, DOT_PRECISION)
        scores = _best_query_scores(query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N) * scale
        teacher_scores = scores
        if DISTILL:
            teacher_scores = _query_scores(teacher_tile, column_tile, DOT_PRECISION) * scale
        column_ids = tl.load(column_ids_ptr + columns, mask=column_valid, other=0)
        positive = valid & (row_ids[:, None] == column_ids[None, :])
        score_grad = _score_gradient(
            scores, valid, positive, rows, columns, num_rows, num_columns,
            row_stats_ptr, column_stats_ptr, grad_row_loss_ptr, grad_column_loss_ptr, normalizer,
            alpha, label_smoothing, teacher_scores, ROW_TERM, COLUMN_TERM, DISTILL)
        routed = _route_to_best_query(score_grad, query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N)
        accumulator = tl.dot(routed.to(column_tile.dtype), column_tile, accumulator,
                             input_precision=DOT_PRECISION)

    accumulator = accumulator * (normalizer * scale)
    flat = tl.arange(0, BLOCK_M * BLOCK_Q)
    out_rows = row_start + flat // BLOCK_Q
    queries = flat % BLOCK_Q
    dims = tl.arange(0, BLOCK_D)
    pointers = (grad_row_ptr + out_rows.to(tl.int64)[:, None] * (QUERIES * FEATURE_DIM)
                + queries[:, None] * FEATURE_DIM + dims[None, :])
    mask = ((out_rows < num_rows) & (queries < QUERIES))[:, None] & (dims < FEATURE_DIM)[None, :]
    tl.store(pointers, accumulator.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_grad_kernel(
    row_ptr, column_ptr, row_ids_ptr, column_ids_ptr, scale_ptr,
    row_stats_ptr, column_stats_ptr, grad_row_loss_ptr, grad_column_loss_ptr, normalizer_ptr,
    grad_column_ptr,
    num_rows, num_columns,
    stride_row, stride_query, stride_row_dim, stride_column, stride_column_dim,
    label_smoothing,
    QUERIES: tl.constexpr, BLOCK_Q: tl.constexpr, FEATURE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_TERM: tl.constexpr, COLUMN_TERM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    column_start = tl.program_id(0) * BLOCK_N
    columns = column_start + tl.arange(0, BLOCK_N)
    column_valid = columns < num_columns
    scale = tl.load(scale_ptr)
    normalizer = tl.load(normalizer_ptr)
    column_tile = _load_plain_tile(column_ptr, column_start, num_columns, stride_column,
                                   stride_column_dim, BLOCK_N, FEATURE_DIM, BLOCK_D)
    column_ids = tl.load(column_ids_ptr + columns, mask=column_valid, other=0)
    accumulator = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for row_start in range(0, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < num_rows
        valid = row_valid[:, None] & column_valid[None, :]
        row_tile = _load_row_tile(row_ptr, row_start, num_rows, stride_row, stride_query,
                                  stride_row_dim, QUERIES, BLOCK_Q, BLOCK_M, FEATURE_DIM, BLOCK_D)
        query_scores = _query_scores(row_tile, column_tile, DOT_PRECISION)
        scores = _best_query_scores(query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N) * scale
        row_ids = tl.load(row_ids_ptr + rows, mask=row_valid, other=0)
        positive = valid & (row_ids[:, None] == column_ids[None, :])
        score_grad = _score_gradient(
            scores, valid, positive, rows, columns, num_rows, num_columns,
            row_stats_ptr, column_stats_ptr, grad_row_loss_ptr, grad_column_loss_ptr, normalizer,
            0.0, label_smoothing, scores, ROW_TERM, COLUMN_TERM, False)
        routed = _route_to_best_query(score_grad, query_scores, QUERIES, BLOCK_Q, BLOCK_M, BLOCK_N)
        accumulator = tl.dot(tl.trans(routed.to(row_tile.dtype)), row_tile, accumulator,
                             input_precision=DOT_PRECISION)

    accumulator = accumulator * (normalizer * scale)
    dims = tl.arange(0, BLOCK_D)
    pointers = grad_column_ptr + columns.to(tl.int64)[:, None] * FEATURE_DIM + dims[None, :]
    mask = column_valid[:, None] & (dims < FEATURE_DIM)[None, :]
    tl.store(pointers, accumulator.to(grad_column_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def target_mass(positives: torch.Tensor, alpha: float, label_smoothing: float) -> torch.Tensor:
    """Sum of each row's targets (1 unless a row has no positive): the cross-entropy of a
    row is ``mass * log_sum_exp - target_dot``."""
    has_positive = (positives > 0).to(torch.float32)
    return (1.0 - label_smoothing) * (alpha + (1.0 - alpha) * has_positive) + label_smoothing


def cross_entropies(stats: torch.Tensor, alpha: float, label_smoothing: float) -> torch.Tensor:
    """The cross-entropy of every row (or column) from its statistics (``ROW_STATS`` or
    ``COLUMN_STATS``): ``mass * log_sum_exp - target_dot``."""
    # mass * (max + log sum) - target_dot, the max cancelling against the target's scores
    mass = target_mass(stats[_STAT["positives"]], alpha, label_smoothing)
    return (mass * (stats[_STAT["log2_exp_sum"]] * LN_2)
            + (mass * stats[_STAT["score_max"]] - stats[_STAT["target_dot"]]))


def _as_three_dims(row_feat: torch.Tensor) -> torch.Tensor:
    return row_feat if row_feat.dim() == 3 else row_feat.unsqueeze(1)


def _launch_config(config: dict) -> tuple[dict, dict]:
    """Split a tile config into kernel constexprs and launch options."""
    launch = {key: config[key] for key in ("num_warps", "num_stages")}
    constants = {key: value for key, value in config.items() if key not in launch}
    return constants, launch


def contrastive_forward(
    row_feat: torch.Tensor,
    column_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    row_ids: torch.Tensor,
    column_ids: torch.Tensor,
    *,
    teacher_feat: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    row_term: bool = True,
    column_term: bool = True,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    row_index_offset: int = 0,
    column_index_offset: int = 0,
    config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of the row and/or column cross-entropy terms (see the module docstring).

    Args:
        row_feat: (R, D) or (R, Q, D); column_feat: (C, D); any strides, one float dtype.
        logit_scale: float32 tensor with one element.
        row_ids, column_ids: int64 (R,) and (C,), any strides; equal ids mark positives.
        teacher_feat: (R, D) momentum features for distillation targets (row term only).
        seed: int64 tensor with one element; when given, a hard negative is drawn per row
            (row term) and per column (column term) by Gumbel-max over the non-positives.
        row_index_offset, column_index_offset: global index of row 0 and column 0 (the
            random stream is keyed on global indices, and negatives are returned global).

    Returns:
        (row_stats (7, R) float32, column_stats (5, C) float32, row_negatives (R,) int64,
        column_negatives (C,) int64); the stats rows are ``ROW_STATS``/``COLUMN_STATS``.
        Tensors of a term that is off, and negatives without a seed, are empty. A row (or
        column) with no negative gets index -1.
    """
    rows3 = _as_three_dims(row_feat)
    num_rows, queries, feature_dim = rows3.shape
    num_columns = column_feat.shape[0]
    device = row_feat.device
    # The kernels read id i at offset i: a strided or expanded view is copied.
    row_ids, column_ids = row_ids.contiguous(), column_ids.contiguous()
    constants, launch = _launch_config(config or _tile_config(queries, feature_dim))
    precision = dot_precision(row_feat.dtype)
    scale = logit_scale.detach().reshape(1).to(torch.float32)
    sample = seed is not None
    seed_arg = seed if sample else scale  # placeholder pointer, never read

    row_stats = torch.empty(len(ROW_STATS), num_rows if row_term else 0, dtype=torch.float32,
                            device=device)
    row_negatives = torch.empty(num_rows if (row_term and sample) else 0, dtype=torch.int64,
                                device=device)
    if row_term and num_rows:
        distill = teacher_feat is not None
        teacher = teacher_feat if distill and teacher_feat is not None else column_feat
        grid = (cdiv(num_rows, constants["BLOCK_M"]),)
        _row_stats_kernel[grid](
            rows3, column_feat, teacher, row_ids, column_ids, scale, seed_arg,
            row_stats, row_negatives,
            num_rows, num_columns, row_index_offset, column_index_offset,
            rows3.stride(0), rows3.stride(1), rows3.stride(2),
            column_feat.stride(0), column_feat.stride(1), teacher.stride(0), teacher.stride(1),
            float(alpha), float(label_smoothing),
            QUERIES=queries, FEATURE_DIM=feature_dim, DISTILL=distill, SAMPLE=sample,
            DOT_PRECISION=precision, **constants, **launch)

    column_stats = torch.empty(len(COLUMN_STATS), num_columns if column_term else 0,
                               dtype=torch.float32, device=device)
    column_negatives = torch.empty(num_columns if (column_term and sample) else 0,
                                   dtype=torch.int64, device=device)
    if column_term and num_columns:
        grid = (cdiv(num_columns, constants["BLOCK_N"]),)
        _column_stats_kernel[grid](
            rows3, column_feat, row_ids, column_ids, scale, seed_arg,
            column_stats, column_negatives,
            num_rows, num_columns, row_index_offset, column_index_offset,
            rows3.stride(0), rows3.stride(1), rows3.stride(2),
            column_feat.stride(0), column_feat.stride(1),
            float(label_smoothing),
            QUERIES=queries, FEATURE_DIM=feature_dim, SAMPLE=sample, DOT_PRECISION=precision,
            **constants, **launch)
    return row_stats, column_stats, row_negatives, column_negatives


def contrastive_backward(
    grad_row_losses: Optional[torch.Tensor],
    grad_column_losses: Optional[torch.Tensor],
    row_feat: torch.Tensor,
    column_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    row_ids: torch.Tensor,
    column_ids: torch.Tensor,
    row_stats: torch.Tensor,
    column_stats: torch.Tensor,
    *,
    teacher_feat: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    need_row_grad: bool = True,
    need_column_grad: bool = True,
    config: Optional[dict] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Gradients of ``sum_i g_i CE_i + sum_j g'_j CE'_j`` for the row features, the column
    features and logit_scale, given the incoming per-row (g) and per-column (g') loss
    gradients (None = that term is off or unused). Feature gradients come back contiguous
    in the features' dtype (None when not needed); the logit_scale gradient is float32 (1,).
    """
    rows3 = _as_three_dims(row_feat)
    num_rows, queries, feature_dim = rows3.shape
    num_columns = column_feat.shape[0]
    device = row_feat.device
    # The kernels read id i at offset i: a strided or expanded view is copied.
    row_ids, column_ids = row_ids.contiguous(), column_ids.contiguous()
    row_term = grad_row_losses is not None
    column_term = grad_column_losses is not None
    distill = teacher_feat is not None and row_term
    constants, launch = _launch_config(config or _tile_config(queries, feature_dim))
    precision = dot_precision(row_feat.dtype)
    scale = logit_scale.detach().reshape(1).to(torch.float32)
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)
    grad_rows_in = grad_row_losses.float().contiguous() if grad_row_losses is not None \
        else placeholder
    grad_columns_in = grad_column_losses.float().contiguous() if grad_column_losses is not None \
        else placeholder
    normalizer = torch.maximum(grad_rows_in.abs().amax() if row_term else placeholder[0],
                               grad_columns_in.abs().amax() if column_term else placeholder[0])
    normalizer = normalizer.clamp_min(torch.finfo(torch.float32).tiny).reshape(1)

    # logit_scale: dCE/dscale = (mass * sum softmax * S - sum T * S) / scale, per row / column.
    grad_scale = torch.zeros(1, dtype=torch.float32, device=device)
    positives, target_dot, probability_dot = (
        _STAT["positives"], _STAT["target_dot"], _STAT["probability_dot"])
    if row_term:
        mass = target_mass(row_stats[positives], alpha if distill else 0.0, label_smoothing)
        grad_scale = grad_scale + (grad_rows_in * (mass * row_stats[probability_dot]
                                                   - row_stats[target_dot])).sum()
    if column_term:
        mass = target_mass(column_stats[positives], 0.0, label_smoothing)
        grad_scale = grad_scale + (grad_columns_in * (mass * column_stats[probability_dot]
                                                      - column_stats[target_dot])).sum()
    grad_scale = grad_scale / scale

    common = dict(QUERIES=queries, FEATURE_DIM=feature_dim, ROW_TERM=row_term,
                  COLUMN_TERM=column_term, DOT_PRECISION=precision)
    grad_row_feat = grad_column_feat = None
    if need_row_grad:
        grad_row_feat = torch.empty(num_rows, queries, feature_dim, dtype=row_feat.dtype,
                                    device=device)
        teacher = teacher_feat if distill and teacher_feat is not None else column_feat
        if num_rows:
            _row_grad_kernel[(cdiv(num_rows, constants["BLOCK_M"]),)](
                rows3, column_feat, teacher, row_ids, column_ids, scale,
                row_stats, column_stats, grad_rows_in, grad_columns_in, normalizer,
                grad_row_feat, num_rows, num_columns,
                rows3.stride(0), rows3.stride(1), rows3.stride(2),
                column_feat.stride(0), column_feat.stride(1), teacher.stride(0), teacher.stride(1),
                float(alpha), float(label_smoothing), DISTILL=distill,
                **common, **constants, **launch)
        grad_row_feat = grad_row_feat.reshape(row_feat.shape)
    if need_column_grad:
        if distill:
            raise NotImplementedError("column gradients with distillation targets")
        grad_column_feat = torch.empty(num_columns, feature_dim, dtype=column_feat.dtype,
                                       device=device)
        if num_columns:
            _column_grad_kernel[(cdiv(num_columns, constants["BLOCK_N"]),)](
                rows3, column_feat, row_ids, column_ids, scale,
                row_stats, column_stats, grad_rows_in, grad_columns_in, normalizer,
                grad_column_feat, num_rows, num_columns,
                rows3.stride(0), rows3.stride(1), rows3.stride(2),
                column_feat.stride(0), column_feat.stride(1),
                float(label_smoothing), **common, **constants, **launch)
    return grad_row_feat, grad_column_feat, grad_scale


# --------------------------------------------------------------------------------------
# torch.library registration (autograd and torch.compile)
# --------------------------------------------------------------------------------------


@torch.library.custom_op("blipfast::contrastive_forward", mutates_args=())
def contrastive_forward_op(
    row_feat: torch.Tensor, column_feat: torch.Tensor, logit_scale: torch.Tensor,
    row_ids: torch.Tensor, column_ids: torch.Tensor, teacher_feat: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], row_term: bool, column_term: bool, alpha: float,
    label_smoothing: float, row_index_offset: int, column_index_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.library op: per-row and per-column cross-entropy losses (float32; empty for a
    term that is off), their statistics, and the sampled negatives (empty without a seed).
    Differentiable in row_feat, column_feat and logit_scale."""
    row_stats, column_stats, row_negatives, column_negatives = contrastive_forward(
        row_feat, column_feat, logit_scale, row_ids, column_ids, teacher_feat=teacher_feat,
        seed=seed, row_term=row_term, column_term=column_term, alpha=alpha,
        label_smoothing=label_smoothing, row_index_offset=row_index_offset,
        column_index_offset=column_index_offset)
    row_losses = cross_entropies(row_stats, alpha if teacher_feat is not None else 0.0,
                                 label_smoothing)
    column_losses = cross_entropies(column_stats, 0.0, label_smoothing)
    return (row_losses, column_losses, row_stats, column_stats, row_negatives, column_negatives)


@contrastive_forward_op.register_fake
def _contrastive_forward_fake(row_feat, column_feat, logit_scale, row_ids, column_ids,
                              teacher_feat, seed, row_term, column_term, alpha,
                              label_smoothing, row_index_offset, column_index_offset):
    num_rows = row_feat.shape[0] if row_term else 0
    num_columns = column_feat.shape[0] if column_term else 0
    sample = seed is not None
    new = row_feat.new_empty
    return (new((num_rows,), dtype=torch.float32), new((num_columns,), dtype=torch.float32),
            new((len(ROW_STATS), num_rows), dtype=torch.float32),
            new((len(COLUMN_STATS), num_columns), dtype=torch.float32),
            new((num_rows if sample else 0,), dtype=torch.int64),
            new((num_columns if sample else 0,), dtype=torch.int64))


@torch.library.custom_op("blipfast::contrastive_backward", mutates_args=())
def contrastive_backward_op(
    grad_row_losses: Optional[torch.Tensor], grad_column_losses: Optional[torch.Tensor],
    row_feat: torch.Tensor, column_feat: torch.Tensor, logit_scale: torch.Tensor,
    row_ids: torch.Tensor, column_ids: torch.Tensor, teacher_feat: Optional[torch.Tensor],
    row_stats: torch.Tensor, column_stats: torch.Tensor, alpha: float, label_smoothing: float,
    need_row_grad: bool, need_column_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.library op: (grad_row_feat, grad_column_feat, grad_logit_scale); a feature
    gradient that is not needed comes back empty."""
    grad_row, grad_column, grad_scale = contrastive_backward(
        grad_row_losses, grad_column_losses, row_feat, column_feat, logit_scale, row_ids,
        column_ids, row_stats, column_stats, teacher_feat=teacher_feat, alpha=alpha,
        label_smoothing=label_smoothing, need_row_grad=need_row_grad,
        need_column_grad=need_column_grad)
    # Two distinct empties: a custom op's outputs may not alias each other.
    return (grad_row if grad_row is not None else row_feat.new_empty(0),
            grad_column if grad_column is not None else column_feat.new_empty(0), grad_scale)


@contrastive_backward_op.register_fake
def _contrastive_backward_fake(grad_row_losses, grad_column_losses, row_feat, column_feat,
                               logit_scale, row_ids, column_ids, teacher_feat, row_stats,
                               column_stats, alpha, label_smoothing, need_row_grad,
                               need_column_grad):
    return (row_feat.new_empty(row_feat.shape if need_row_grad else (0,)),
            column_feat.new_empty(column_feat.shape if need_column_grad else (0,)),
            row_feat.new_empty((1,), dtype=torch.float32))


def _forward_setup_context(ctx, inputs, output):
    (row_feat, column_feat, logit_scale, row_ids, column_ids, teacher_feat, _seed, row_term,
     column_term, alpha, label_smoothing, _row_offset, _column_offset) = inputs
    _, _, row_stats, column_stats, _, _ = output
    ctx.save_for_backward(*savable(row_feat, column_feat, logit_scale, row_ids, column_ids,
                                   teacher_feat, row_stats, column_stats))
    ctx.terms = (row_term, column_term)
    ctx.alpha = alpha
    ctx.label_smoothing = label_smoothing


def _forward_backward(ctx, grad_row_losses, grad_column_losses, *_unused_grads):
    (row_feat, column_feat, logit_scale, row_ids, column_ids, teacher_feat, row_stats,
     column_stats) = ctx.saved_tensors
    row_term, column_term = ctx.terms
    if row_term and grad_row_losses is None:
        grad_row_losses = torch.zeros(row_feat.shape[0], dtype=torch.float32,
                                      device=row_feat.device)
    if column_term and grad_column_losses is None:
        grad_column_losses = torch.zeros(column_feat.shape[0], dtype=torch.float32,
                                         device=column_feat.device)
    need_row, need_column, need_scale = ctx.needs_input_grad[:3]
    grad_row, grad_column, grad_scale = contrastive_backward_op(
        grad_row_losses if row_term else None, grad_column_losses if column_term else None,
        row_feat, column_feat, logit_scale, row_ids, column_ids, teacher_feat, row_stats,
        column_stats, ctx.alpha, ctx.label_smoothing, need_row, need_column)
    grad_scale = grad_scale.reshape(logit_scale.shape).to(logit_scale.dtype) if need_scale else None
    return ((grad_row if need_row else None), (grad_column if need_column else None), grad_scale,
            None, None, None, None, None, None, None, None, None, None)


contrastive_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)
