"""The ops on CPU tensors without the Triton interpreter, where they run the PyTorch
reference (blipfast.reference): what their docstrings promise of the kernels' results
holds there too (contiguous outputs, one graph under torch.compile, kv_index checked when
a compiled graph runs)."""

import pytest
import torch

import blipfast.ops as ops


def test_outputs_are_contiguous_as_the_kernels_are(reference_path):
    """attention's output, bias_gelu's and both of add_layer_norm's are contiguous for
    strided inputs, so that a caller's ``.view`` works on CPU as on a GPU."""
    generator = torch.Generator().manual_seed(41)
    q, k, v = torch.randn(3, 2, 5, 4, 16, generator=generator).unbind(0)  # (B, L, H, D)
    out = ops.attention(q, k, v)
    assert out.is_contiguous()
    assert out.view(2, 5, 64).shape == (2, 5, 64)
    x = torch.randn(32, 6, generator=generator).t()  # transposed: (6, 32), strides (1, 6)
    assert ops.bias_gelu(x, torch.randn(32, generator=generator)).is_contiguous()
    normalized, total = ops.add_layer_norm(x, x.clone(), torch.ones(32), torch.zeros(32))
    assert normalized.is_contiguous() and total.is_contiguous()


def test_contrastive_losses_compile_into_one_graph(reference_path):
    """Without a process group the gathers are not called, so nothing leaves the graph."""
    generator = torch.Generator().manual_seed(42)
    image_feat, text_feat = torch.randn(2, 4, 8, generator=generator).unbind(0)
    scale = torch.tensor(5.0)
    compiled = torch.compile(ops.contrastive_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(image_feat, text_feat, scale),
                               ops.contrastive_loss(image_feat, text_feat, scale))
    with_negatives = torch.compile(ops.contrastive_loss_with_hard_negatives, backend="eager",
                                   fullgraph=True)
    torch.testing.assert_close(with_negatives(image_feat, text_feat, scale).loss,
                               ops.contrastive_loss(image_feat, text_feat, scale))


def test_kv_index_out_of_range_raises_when_a_compiled_graph_runs(reference_path):
    """Traced, the up-front range check cannot read the index: the ``checked_index`` op
    checks it when the graph runs, with the ValueError of eager mode, instead of the
    reference indexing from the end or failing with another error."""
    generator = torch.Generator().manual_seed(43)
    q = torch.randn(3, 4, 2, 16, generator=generator)
    k, v = torch.randn(2, 2, 6, 2, 16, generator=generator).unbind(0)
    compiled = torch.compile(ops.attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, kv_index=torch.tensor([0, 1, 1])),
                               ops.attention(q, k, v, kv_index=torch.tensor([0, 1, 1])))
    for index in ([0, 2, 1], [-1, 0, 1]):
        with pytest.raises(ValueError, match=r"kv_index \(rows of k and v\): values must lie "
                                             r"in \[0, 2\)"):
            compiled(q, k, v, kv_index=torch.tensor(index))


def test_reference_attention_without_masks_skips_the_masking():
    """Without a mask or causal, the reference takes no masking passes and keeps no masked
    copy of the probabilities for the backward (the models' CPU path was 1.2x slower and
    held 30% more for the backward than transformers'), with bit-identical results."""
    from blipfast import reference

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=generator, requires_grad=True)
               for _ in range(3))
    everything = torch.ones(2, 9, dtype=torch.bool)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plain = reference.attention(q, k, v)
    masked_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: masked_saved.append(t) or t,
                                                  lambda t: t):
        masked = reference.attention(q, k, v, key_padding_mask=everything)
    assert torch.equal(plain, masked)
    gradient = torch.randn(plain.shape, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain, (q, k, v), gradient),
                                                 torch.autograd.grad(masked, (q, k, v), gradient)))
    def probability_buffers(tensors):  # distinct (B, H, Lq, Lk) float buffers kept
        return len({t.untyped_storage().data_ptr() for t in tensors
                    if t.is_floating_point() and t.numel() == 2 * 2 * 9 * 9})

    assert probability_buffers(saved) == 1 < probability_buffers(masked_saved)


def _autocast_cases(generator):
    """(name, call) pairs of ops on float32 inputs whose products autocast would run in
    bfloat16 were it on inside the reference."""
    q, k, v = torch.randn(3, 2, 5, 2, 32, generator=generator).unbind(0)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    image, text, image_m, text_m = torch.nn.functional.normalize(
        torch.randn(4, 6, 16, generator=generator), dim=-1).unbind(0)
    queue_image, queue_text = torch.nn.functional.normalize(
        torch.randn(2, 5, 16, generator=generator), dim=-1).unbind(0)
    scale = torch.tensor(20.0)
    return [
        ("attention", lambda: ops.attention(q, k, v, key_padding_mask=mask, causal=True)),
        ("contrastive_loss", lambda: ops.contrastive_loss(image, text, scale)),
        ("contrastive_loss_with_queue", lambda: ops.contrastive_loss_with_queue(
            image, text, scale, image_feat_momentum=image_m, text_feat_momentum=text_m,
            image_queue=queue_image, text_queue=queue_text)),
        ("contrastive_loss_with_hard_negatives", lambda: ops.contrastive_loss_with_hard_negatives(
            image, text, scale, generator=torch.Generator().manual_seed(3)).loss),
    ]


@pytest.mark.parametrize("name", ["attention", "contrastive_loss", "contrastive_loss_with_queue",
                                  "contrastive_loss_with_hard_negatives"])
def test_autocast_leaves_the_reference_in_its_inputs_dtype(reference_path, name):
    """Under ``torch.autocast`` (bfloat16, CPU) the reference path computes what it does
    without: float32 inputs are computed in float32, as the kernels compute them. Its
    einsums and matmuls ran in bfloat16 under autocast, their results returned as
    float32 (attention off by 9.5e-3, the contrastive loss by 1.5e-2)."""
    call = dict(_autocast_cases(torch.Generator().manual_seed(43)))[name]
    expected = call()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = call()
    assert actual.dtype == expected.dtype == torch.float32, name
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
