"""The attention op's contract beyond numerics: argument errors, torch.compile tracing,
and the reference path on CPU without the Triton interpreter."""

import numpy
import pytest
import torch

import blipfast
from blipfast import reference
from blipfast.ops import attention
from compile_checks import assert_compiles_like_reference


def _inputs(batch=2, len_q=5, len_k=7, heads=2, head_dim=32, dtype=torch.float32):
    q = torch.randn(batch, len_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, len_k, heads, head_dim, dtype=dtype)
    v = torch.randn(batch, len_k, heads, head_dim, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("change, error, words", [
    (lambda q, k, v: (q.numpy(), k, v, {}), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q, k.half(), v.half(), {}), TypeError, "share one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double(), {}), TypeError, "q has dtype"),
    (lambda q, k, v: (q.int(), k, v, {}), TypeError, "q has dtype"),
    (lambda q, k, v: (q, k[:, :, :1], v[:, :, :1], {}), ValueError, "heads"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16], {}), ValueError, "head dim"),
    (lambda q, k, v: (q, k, v[:, :3], {}), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8], {}), ValueError,
     "head dim 8 of q is not supported"),
    (lambda q, k, v: (q, k[:1], v[:1], {}), ValueError, "pass kv_index"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 7)}), TypeError,
     "key_padding_mask must have dtype torch.bool"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)}),
     ValueError, "key_padding_mask must have shape"),
    (lambda q, k, v: (q, k, v, {"kv_index": torch.tensor([0.0, 1.0])}), TypeError,
     "kv_index must have dtype"),
    (lambda q, k, v: (q, k, v, {"kv_index": torch.tensor([0, 1, 1])}), ValueError,
     "kv_index must have shape"),
    (lambda q, k, v: (q, k, v, {"kv_index": torch.tensor([0, 2])}), ValueError,
     "kv_index values must lie in [0, 2)"),
    (lambda q, k, v: (q, k, v, {"kv_index": torch.tensor([-1, 0])}), ValueError,
     "kv_index values must lie in [0, 2) (the batch of k and v), got values from -1 to 0"),
    (lambda q, k, v: (q, k, v, {"causal": 1}), TypeError, "causal must be a bool"),
    (lambda q, k, v: (q, k, v, {"causal": numpy.bool_(True)}), TypeError,
     "causal must be a bool, got numpy.bool"),
    (lambda q, k, v: (q, k, v, {"softmax_scale": torch.tensor(1.0)}), TypeError,
     "softmax_scale must be a float or None, got torch.Tensor"),
    (lambda q, k, v: (q, k, v, {"softmax_scale": float("nan")}), ValueError,
     "softmax_scale must be finite"),
    (lambda q, k, v: (q, k, v, {"softmax_scale": torch.tensor(1.0)}), TypeError,
     "softmax_scale must be a float"),
    (lambda q, k, v: (q, k.to("meta"), v.to("meta"), {}), ValueError, "k is on meta"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": [[True] * 7] * 2}), TypeError,
     "key_padding_mask must be a bool tensor or None, got list"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 7, dtype=torch.bool,
                                                               device="meta")}),
     ValueError, "key_padding_mask is on meta but q is on cpu"),
])
def test_bad_arguments_raise_clear_errors(change, error, words):
    q, k, v, options = change(*_inputs())
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        attention(q, k, v, **options)


@pytest.mark.parametrize("sizes", [dict(len_q=0), dict(len_k=0), dict(batch=0), dict(heads=0)],
                         ids=str)
def test_empty_inputs_give_zero_gradients(monkeypatch, sizes):
    """Zero queries, keys, batch rows or heads: the output and every gradient are empty or
    zero. New float tensors start as NaN here, so an output the launchers leave unwritten
    shows."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    inputs = [t.requires_grad_() for t in _inputs(**sizes)]
    mask = torch.ones(inputs[1].shape[:2], dtype=torch.bool)
    out = attention(*inputs, key_padding_mask=mask)
    assert out.shape == inputs[0].shape
    assert (out == 0).all()  # no keys: zero rows (vacuous when out is empty)
    out.sum().backward()
    for tensor in inputs:
        assert tensor.grad.shape == tensor.shape and (tensor.grad == 0).all()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_traces_the_custom_op(dynamic):
    """One graph (fullgraph=True raises on a break), also with dynamic=True, where the
    float softmax_scale is a symbolic input the argument checks must trace."""
    q, k, v = _inputs(len_q=9, len_k=9)
    mask = torch.rand(2, 9) > 0.3
    mask[:, 0] = True

    def step(q, k, v, scale):
        return attention(q, k, v, causal=True, key_padding_mask=mask,
                         softmax_scale=scale).square().sum()

    def expected_step(q, k, v, scale):
        return reference.attention(q, k, v, causal=True, key_padding_mask=mask,
                                   softmax_scale=scale).square().sum()

    assert_compiles_like_reference(step, expected_step, (q, k, v), 0.3, dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_kv_index_out_of_range_raises_when_compiled(dynamic):
    """Traced, the eager range check cannot read kv_index; it runs with the compiled graph
    instead (a custom op), before the kernels read (and in the backward write) rows of k
    and v by it. In range, forward and gradients match the reference."""
    q, k, v = _inputs(len_q=5, len_k=7)
    q = q.repeat(2, 1, 1, 1)  # 4 query rows on 2 key rows

    def step(q, k, v, index):
        return attention(q, k, v, kv_index=index).square().sum()

    def expected_step(q, k, v, index):
        return reference.attention(q, k, v, kv_index=index).square().sum()

    index = torch.tensor([1, 0, 1, 1])
    assert_compiles_like_reference(step, expected_step, (q, k, v), index, dynamic=dynamic)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for bad in ([0, 2, 1, 0], [0, -1, 1, 0]):
        with pytest.raises(ValueError, match=r"kv_index .* values must lie in \[0, 2\)"):
            compiled(q, k, v, torch.tensor(bad))
    from blipfast.ops._checks import checked_index
    torch.library.opcheck(checked_index, (torch.tensor([1, 0, 1]), 2, "kv_index"))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_keeps_the_batches_of_a_kv_index_call_dynamic(strict):
    """``torch.export`` with the query and key batches dynamic: the exported program runs
    on other batch sizes, equal to the reference, and checks the index when it runs.
    Strict export failed ("specialized it to be a constant (2)"): the range check's message
    formatted the key batch while tracing, which fixed it to the example's value."""
    from torch.export import Dim

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, index):
            return attention(q, k, v, causal=True, kv_index=index)

    q, k, v = _inputs(len_q=5, len_k=7)  # batch 2
    q = q.repeat(2, 1, 1, 1)
    batch, key_batch = Dim("batch", min=2, max=16), Dim("key_batch", min=2, max=16)
    exported = torch.export.export(
        Attend(), (q, k, v, torch.tensor([1, 0, 1, 1])),
        dynamic_shapes=({0: batch}, {0: key_batch}, {0: key_batch}, {0: batch}), strict=strict)
    generator = torch.Generator().manual_seed(48)
    q3, k3, v3 = (torch.randn(shape, generator=generator)
                  for shape in ((5, 5, 2, 32), (3, 7, 2, 32), (3, 7, 2, 32)))
    index = torch.tensor([2, 0, 1, 2, 2])
    torch.testing.assert_close(exported.module()(q3, k3, v3, index),
                               reference.attention(q3, k3, v3, causal=True, kv_index=index),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"kv_index .* values must lie in \[0, 3\)"):
        exported.module()(q3, k3, v3, torch.tensor([2, 0, 3, 1, 0]))


@pytest.mark.interpreter
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_jit_trace_records_the_reference(grad):
    """``torch.jit.trace`` over the ops (attention here, and a LayerNorm and bias + GELU
    beside it) records their PyTorch reference: a Triton launch cannot be recorded, and
    the trace failed inside the launcher ("'Tensor' object has no attribute
    'bit_length'"). The traced module computes the reference on new inputs."""
    import blipfast.ops as ops

    weight, bias = torch.randn(2, 32, generator=torch.Generator().manual_seed(49)).unbind(0)

    class Block(torch.nn.Module):
        def forward(self, q, k, v, mask):
            out = ops.attention(q, k, v, causal=True, key_padding_mask=mask)
            return ops.bias_gelu(ops.layer_norm(out.flatten(2), weight, bias), bias)

    def expected(q, k, v, mask):
        out = reference.attention(q, k, v, causal=True, key_padding_mask=mask)
        return reference.bias_gelu(reference.layer_norm(out.flatten(2), weight, bias), bias)

    q, k, v = _inputs(len_q=5, len_k=7, head_dim=16)  # 2 heads of 16: 32 features
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(Block(), (q, k, v, mask), check_trace=False)
    generator = torch.Generator().manual_seed(50)
    q, k, v = (torch.randn(3, 6, 2, 16, generator=generator) for _ in range(3))
    mask = torch.rand(3, 6, generator=generator) > 0.3
    torch.testing.assert_close(traced(q, k, v, mask), expected(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_nan_in_masked_keys_behaves_as_documented(path, monkeypatch):
    """What the docstring says of a NaN in a masked key's k or v (a cache filled with
    ``torch.empty``): in v, NaN outputs; in k, a finite output but a NaN gradient for q;
    k's and v's gradients stay finite."""
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at every call
    q, k, v = _inputs(batch=1, len_q=4, len_k=8, heads=1, head_dim=16)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    for poisoned in ("v", "k"):
        leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
        with torch.no_grad():
            leaves["qkv".index(poisoned)][0, 7, 0, 3] = float("nan")
        out = attention(*leaves, key_padding_mask=mask)
        if poisoned == "v":
            assert out.isnan().any()
            continue
        assert out.isfinite().all()
        out.sum().backward()
        assert leaves[0].grad.isnan().any()
        assert leaves[1].grad.isfinite().all() and leaves[2].grad.isfinite().all()


@pytest.mark.interpreter
def test_custom_op_passes_torch_library_checks():
    q, k, v = _inputs(len_q=6, len_k=10)
    mask = torch.rand(2, 10) > 0.5
    arguments = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, None,
                 False, 0.2)
    from blipfast.kernels.attention import attention_forward_op
    torch.library.opcheck(attention_forward_op, arguments,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_cpu_without_interpreter_uses_the_reference(reference_path):
    q, k, v = [t.requires_grad_() for t in _inputs()]
    out = attention(q, k, v, causal=True)
    expected = reference.attention(q, k, v, causal=True)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_public_api_is_exported():
    assert blipfast.ops.attention is attention
    assert callable(blipfast.reference.attention)


@pytest.mark.parametrize("options", [
    dict(),
    dict(causal=True, softmax_scale=2.5),
    dict(padding=True, kv_index=(1, 0, 1)),
    dict(causal=True, padding=True, empty_key_row=0),
], ids=str)
def test_flash_order_gradients_are_autograds_in_float64(options):
    """reference.attention_with_flash_gradients (the tests' second yardstick) computes
    the same output and gradients as autograd through reference.attention, in float64
    where the two orders' roundings are far below the comparison; with every key of one
    key batch row masked, its queries' output and gradients are exactly 0."""
    generator = torch.Generator().manual_seed(11)
    options = dict(options)
    key_batch = 2 if "kv_index" in options else 3
    q = torch.randn(3, 6, 2, 24, generator=generator, dtype=torch.float64)
    k = torch.randn(key_batch, 9, 2, 24, generator=generator, dtype=torch.float64)
    v = torch.randn(key_batch, 9, 2, 24, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(3, 6, 2, 24, generator=generator, dtype=torch.float64)
    mask, empty_key_row = None, options.pop("empty_key_row", None)
    if options.pop("padding", False):
        mask = torch.arange(9)[None, :] < torch.tensor([4, 9, 7][:key_batch])[:, None]
        if empty_key_row is not None:
            mask[empty_key_row] = False
    kv_index = options.pop("kv_index", None)
    if kv_index is not None:
        kv_index = torch.tensor(kv_index)
    options.update(key_padding_mask=mask, kv_index=kv_index)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, **options)
    expected = (out, *torch.autograd.grad(out, leaves, grad_out))
    actual = reference.attention_with_flash_gradients(q, k, v, grad_out, **options)
    for name, got, want in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected):
        assert got.dtype == torch.float64 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
        assert want.abs().max() > 0.1, name  # a comparison of zeros would check nothing
    if empty_key_row is not None:  # no kv_index here: query row i uses key row i
        assert (actual[0][empty_key_row] == 0).all() and (actual[1][empty_key_row] == 0).all()


def test_flash_order_gradient_of_a_one_key_row_is_rounding_not_zero():
    """Where a row's softmax is one key, autograd's order gives grad_q exactly 0 and the
    flash order the rounding of dP - rowsum(dO * O), which is why the tests take both
    orders' errors as PyTorch's: in float32 it is not 0 on these inputs, and far below
    the inputs' magnitude."""
    generator = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(1, 16, 2, 96, generator=generator) for _ in range(4))
    k, v = k[:, :1], v[:, :1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_q_autograd = torch.autograd.grad(reference.attention(*leaves, upcast=False),
                                          leaves[0], grad_out)[0]
    grad_q_flash = reference.attention_with_flash_gradients(q, k, v, grad_out)[1]
    assert (grad_q_autograd == 0).all()
    assert 0 < grad_q_flash.abs().max() < 1e-4
