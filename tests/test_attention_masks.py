"""Masks the op does not take directly, as calls of it (CPU, Triton interpreter): BLIP-2's
Q-Former masks, and a decode step over a preallocated (static) cache.

The Q-Former runs its learned queries and a text through one self-attention, under one of
three masks over the concatenated sequence [queries; text]:

- bidirectional (image-text matching): every row sees every unpadded key;
- unimodal (contrastive): queries see queries, text sees text;
- multimodal causal (image-grounded text generation): queries see queries only, a text
  token sees every query and the text tokens up to itself.

The op takes no (B, L, L) mask: each of these is one or two calls on views of the same
projections, the text rows of the generation mask being the op's bottom-right aligned
causal rule with the queries as a prefix of the keys. The tests hold that composition to a
dense masked softmax written from the definition above, forward and every gradient, so
that the Q-Former can be built on the op as it is.
"""

import pytest
import torch

from blipfast.ops import attention
from tolerances import assert_close_to_reference

QUERIES = 16  # BLIP-2 has 32; 16 keeps the interpreter quick
TEXT_LENGTHS = (7, 4)  # the second text is padded: 3 padding tokens
HEADS = 2
HEAD_DIM = 32
MASKS = ("bidirectional", "unimodal", "multimodal_causal")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: interpreter_like_gpu.py


def _dense_mask(mask_name: str, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool, True = row sees column, over [queries; text], from the definition."""
    batch, text_length = text_mask.shape
    length = QUERIES + text_length
    is_query = torch.arange(length) < QUERIES
    if mask_name == "bidirectional":
        sees = torch.ones(length, length, dtype=torch.bool)
    elif mask_name == "unimodal":
        sees = is_query[:, None] == is_query[None, :]
    else:
        position = torch.arange(length)
        text_sees = is_query[None, :] | (position[None, :] <= position[:, None])
        sees = torch.where(is_query[:, None], is_query[None, :], text_sees)
    key_kept = torch.cat([torch.ones(batch, QUERIES, dtype=torch.bool), text_mask], dim=1)
    return sees[None] & key_kept[:, None, :]


def _dense_attention(q, k, v, mask):
    """softmax(q.k / sqrt(D)) v under a (B, Lq, Lk) bool mask; q, k, v (B, L, H, D)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / HEAD_DIM ** 0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def _assert_matches_dense(label, function, dense_function, inputs, grad_out, dtype):
    """``function``'s output and q, k, v gradients in ``dtype`` against
    ``dense_function``'s in float64, within the tolerance table (float64 ``inputs`` and
    ``grad_out``)."""
    def run(run_function, run_dtype):
        leaves = [tensor.to(run_dtype).requires_grad_() for tensor in inputs]
        out = run_function(*leaves)
        out.backward(grad_out.to(run_dtype))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    actual = run(function, dtype)
    torch_same_dtype = run(dense_function, dtype)
    exact = run(dense_function, torch.float64)
    for name, got, native, expected in zip(("out", "dq", "dk", "dv"), actual, torch_same_dtype,
                                           exact):
        assert_close_to_reference(f"{label} {name}", got, native, expected)


def _composed_attention(mask_name, q, k, v, text_mask):
    """The same attention as calls of blipfast.ops.attention on views of q, k, v."""
    key_kept = torch.cat([text_mask.new_ones(text_mask.shape[0], QUERIES), text_mask], dim=1)
    if mask_name == "bidirectional":
        return attention(q, k, v, key_padding_mask=key_kept)
    queries = attention(q[:, :QUERIES], k[:, :QUERIES], v[:, :QUERIES])
    if mask_name == "unimodal":
        text = attention(q[:, QUERIES:], k[:, QUERIES:], v[:, QUERIES:],
                         key_padding_mask=text_mask)
    else:  # text row i sees key j <= i + QUERIES: all queries, then causal over the text
        text = attention(q[:, QUERIES:], k, v, causal=True, key_padding_mask=key_kept)
    return torch.cat([queries, text], dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_name", MASKS)
def test_qformer_masks_compose_from_attention_calls(mask_name, dtype):
    generator = torch.Generator().manual_seed(MASKS.index(mask_name) * 10 + DTYPES.index(dtype))
    text_length = max(TEXT_LENGTHS)
    text_mask = torch.arange(text_length)[None, :] < torch.tensor(TEXT_LENGTHS)[:, None]
    shape = (len(TEXT_LENGTHS), QUERIES + text_length, HEADS, HEAD_DIM)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
    dense_mask = _dense_mask(mask_name, text_mask)
    _assert_matches_dense(mask_name, lambda q, k, v: _composed_attention(mask_name, q, k, v,
                                                                         text_mask),
                          lambda q, k, v: _dense_attention(q, k, v, dense_mask),
                          inputs, grad_out, dtype)


def test_multimodal_causal_text_rows_see_the_queries_but_queries_do_not_see_the_text():
    """The composition's structure itself: changing a text token's key or value leaves the
    query rows alone and moves only the text rows at or after it (the definition the dense
    reference above is written from, checked on the op directly)."""
    generator = torch.Generator().manual_seed(7)
    text_mask = torch.ones(1, 5, dtype=torch.bool)
    q, k, v = (torch.randn(1, QUERIES + 5, HEADS, HEAD_DIM, generator=generator)
               for _ in range(3))
    before = _composed_attention("multimodal_causal", q, k, v, text_mask)
    changed = QUERIES + 2
    k2, v2 = k.clone(), v.clone()
    k2[:, changed] += 1.0
    v2[:, changed] += 1.0
    after = _composed_attention("multimodal_causal", q, k2, v2, text_mask)
    moved = (after - before).abs().amax(dim=(0, 2, 3)) > 1e-4
    assert moved.tolist() == [False] * changed + [True] * (5 - 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_token_decode_over_a_static_cache(dtype):
    """A decode step over a zero-filled cache of fixed length (what CUDA graphs need: no
    shape changes between steps) with a padding mask of the filled positions gives the
    newest row of causal attention over the filled prefix, and its gradients."""
    generator = torch.Generator().manual_seed(11)
    cache_length, filled = 13, (9, 5)  # the rows of a batch may have filled different lengths
    batch = len(filled)
    q_full, k_full, v_full = (torch.randn(batch, cache_length, HEADS, HEAD_DIM,
                                          generator=generator, dtype=torch.float64)
                              for _ in range(3))
    grad_out = torch.randn(batch, 1, HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
    filled_mask = torch.arange(cache_length)[None, :] < torch.tensor(filled)[:, None]

    def decode(q, k, v):  # the cache: zeros past each row's filled length
        k, v = k * filled_mask[:, :, None, None], v * filled_mask[:, :, None, None]
        newest = torch.stack([q[row, length - 1] for row, length in enumerate(filled)])
        return attention(newest[:, None], k, v, key_padding_mask=filled_mask)

    def causal_prefix(q, k, v):  # each row's own causal attention, its newest query
        return torch.stack([
            _dense_attention(q[row:row + 1, :length], k[row:row + 1, :length],
                             v[row:row + 1, :length],
                             torch.ones(length, length, dtype=torch.bool).tril()[None])[0, -1:]
            for row, length in enumerate(filled)])

    _assert_matches_dense("decode", decode, causal_prefix, (q_full, k_full, v_full), grad_out,
                          dtype)
