"""Cross-entropy test cases shared by the CPU (interpreter) and GPU test modules: each case
draws fresh logits and labels, runs ``blipfast.ops.cross_entropy`` forward and backward
for every reduction and compares the loss and the logits' gradient with the float64
reference within the tolerance table (PyTorch's own error: for the gradient,
``F.cross_entropy`` run natively in the logits' dtype; for the float32 loss, run in float32
on those logits, as autocast runs it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blipfast import reference
from blipfast.ops.cross_entropy import cross_entropy
from tolerances import assert_close_to_reference


@dataclass(frozen=True)
class CrossEntropyCase:
    name: str
    shape: tuple[int, ...]  # logits' shape; the last dimension is the vocabulary
    label_smoothing: float = 0.0
    ignored_fraction: float = 0.0  # labels set to ignore_index
    layout: str = "contiguous"  # or "shifted" (logits[:, :-1] of a longer tensor), "transposed"
    # (logits with the vocabulary not unit-strided; labels strided too)
    scale: float = 1.0  # logits ~ scale * N(0, 1) + offset
    offset: float = 0.0

    def __str__(self) -> str:
        return self.name


CASES = [
    CrossEntropyCase("seven_rows_v100", (7, 100)),
    CrossEntropyCase("lm_3x9_v1000_smoothing_ignored", (3, 9, 1000), label_smoothing=0.1,
                     ignored_fraction=0.3),
    CrossEntropyCase("shifted_lm_view_v300", (3, 9, 300), label_smoothing=0.1,
                     ignored_fraction=0.2, layout="shifted"),
    CrossEntropyCase("vocabulary_67", (5, 67), label_smoothing=0.2),
    CrossEntropyCase("offset_logits", (4, 130), offset=60.0),
    CrossEntropyCase("peaked_softmax", (4, 130), scale=25.0, label_smoothing=0.1),
    CrossEntropyCase("single_class", (6, 1)),
    CrossEntropyCase("four_dimensions", (2, 3, 4, 50), ignored_fraction=0.25),
    CrossEntropyCase("transposed_vocabulary", (5, 40), layout="transposed"),
    CrossEntropyCase("transposed_3d", (3, 4, 24), layout="transposed", ignored_fraction=0.25),
]
IGNORE_INDEX = -100


def make_inputs(case: CrossEntropyCase, dtype: torch.dtype, device: str,
                generator: torch.Generator):
    """(logits in the case's layout, labels, a per-row weight for the backward)."""
    shape = case.shape
    if case.layout == "shifted":
        values = torch.randn(shape[0], shape[1] + 1, shape[2], generator=generator)
    elif case.layout == "transposed":
        values = torch.randn(*reversed(shape), generator=generator)
    else:
        values = torch.randn(*shape, generator=generator)
    values = case.scale * values + case.offset
    logits = values.to(device, dtype)
    if case.layout == "shifted":
        logits = logits[:, :-1]
        assert not logits.is_contiguous()
    elif case.layout == "transposed":
        logits = logits.permute(*reversed(range(logits.dim())))
        assert logits.stride(-1) != 1
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    ignored = torch.rand(shape[:-1], generator=generator) < case.ignored_fraction
    labels = labels.masked_fill(ignored, IGNORE_INDEX).to(device)
    if case.layout == "transposed":  # the labels too: stored (T, B) for 3-D, stride 2 for 1-D
        storage = torch.stack([labels, (labels + 1) % shape[-1]], dim=-1)
        labels = storage[..., 0] if labels.dim() == 1 else storage[..., 0].t().contiguous().t()
        assert labels.dim() == 1 and labels.stride() == (2,) or labels.stride(-1) != 1
    row_weight = torch.randn(shape[:-1], generator=generator).to(device)
    return logits, labels, row_weight


def run_case(case: CrossEntropyCase, dtype: torch.dtype, device: str, seed: int) -> None:
    """Every reduction: loss and the logits' gradient against the reference."""
    generator = torch.Generator().manual_seed(seed)
    logits, labels, row_weight = make_inputs(case, dtype, device, generator)
    for reduction in ("mean", "sum", "none"):
        def run(function, leaf):
            loss = function(leaf, labels, ignore_index=IGNORE_INDEX,
                            label_smoothing=case.label_smoothing, reduction=reduction)
            weighted = (loss.double() * row_weight.double()).sum() if reduction == "none" \
                else loss.double() * 1.7
            return loss, torch.autograd.grad(weighted, leaf)[0]

        actual = run(cross_entropy, logits.detach().requires_grad_())
        assert actual[0].dtype == torch.float32 and actual[1].dtype == dtype
        assert actual[0].shape == (labels.shape if reduction == "none" else ())
        exact = run(reference.cross_entropy, logits.detach().double().requires_grad_())
        same_dtype = run(lambda *args, **kwargs: reference.cross_entropy(*args, **kwargs,
                                                                         upcast=False),
                         logits.detach().requires_grad_())
        # The loss is float32 (as autocast computes cross-entropy): its yardstick is
        # PyTorch's float32 loss of these logits. Natively in fp16 a smoothed sum over the
        # vocabulary overflows (inf), and in bf16 it is off by the order of the loss.
        float32_loss = run(reference.cross_entropy, logits.detach().requires_grad_())[0]
        assert float32_loss.dtype == torch.float32 or dtype == torch.float64
        yardsticks = (float32_loss, same_dtype[1])
        for name, index in (("loss", 0), ("grad_logits", 1)):
            assert_close_to_reference(f"{case}/{reduction}/{name}", actual[index],
                                      yardsticks[index], exact[index])


def check_confident_rows(device: str) -> None:
    """float32 rows whose label is by far the largest logit (a language model late in
    training), the logits large and of one sign or centred: the loss and the logits'
    gradient are within 4 times PyTorch's own float32 error of the float64 reference, with
    no absolute floor (these errors are far below the tolerance table's floor). A row's
    largest logit must cancel exactly in ``x - log_sum_exp`` and ``log_sum_exp - x_label``;
    a single stored log-sum-exp put 17 to 44 times PyTorch's error here."""
    generator = torch.Generator().manual_seed(5)
    for scale, offset in ((25.0, 0.0), (10.0, 40.0)):
        logits = (scale * torch.randn(64, 1000, generator=generator) + offset).to(device)
        labels = logits.argmax(-1)

        def run(function, leaf):
            loss = function(leaf, labels)
            return loss.double(), torch.autograd.grad(loss, leaf)[0].double()

        actual = run(cross_entropy, logits.clone().requires_grad_())
        exact = run(reference.cross_entropy, logits.double().requires_grad_())
        same_dtype = run(lambda *args: reference.cross_entropy(*args, upcast=False),
                         logits.clone().requires_grad_())
        for name, index in (("loss", 0), ("grad_logits", 1)):
            error = (actual[index] - exact[index]).abs().max().item()
            torch_error = (same_dtype[index] - exact[index]).abs().max().item()
            assert error <= 4 * torch_error + 1e-8, \
                f"scale {scale} offset {offset} {name}: {error:.2e} vs PyTorch's {torch_error:.2e}"
