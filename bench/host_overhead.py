"""Host time per call of each op: the Python a call costs before its kernels run.

At the short text shapes a kernel takes a few microseconds on an H100, so what a call
costs on the host decides whether the GPU waits: a benchmark of such a kernel measures
the host, not the kernel, once the host is slower.

- On a GPU the ops run for real at tiny shapes, so the GPU waits on the host and the wall
  time per call is the host's (Triton's launch included); PyTorch's equivalents are timed
  the same way beside them.
- On a CPU machine each kernel launch is intercepted (nothing runs): that is blipfast's
  own host time, without Triton's launch. PyTorch's equivalents would compute on the CPU
  there, so they are not shown.

A second table times whole training steps (forward + backward) of BLIP at BLIP-base's
depth (12 + 12 layers) with tiny widths, batch 2: the host time of a step, against
transformers' eager model timed the same way. On CPU both run their (tiny) arithmetic for
real, except blipfast's intercepted kernels. If a step's host time approaches its GPU
time at batch 64, the GPU waits on Python.

    python bench/host_overhead.py [--calls 2000] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)  # a CPU run intercepts the launches instead

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from blipfast import ops  # noqa: E402
from command_line import integer_at_least  # noqa: E402
from launch_interception import kernel_launches_intercepted  # noqa: E402


def _per_call_microseconds(function: Callable[[], object], calls: int, cuda: bool) -> float:
    for _ in range(max(50, calls // 10)):
        function()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _backward(function: Callable[[], torch.Tensor], inputs: list[torch.Tensor]):
    """A call of ``function`` followed by its backward; the inputs' gradients are reset."""
    def run():
        output = function()
        output.backward(torch.ones_like(output))
        for tensor in inputs:
            tensor.grad = None
    return run


def _kernels_intercepted() -> contextlib.AbstractContextManager:
    """On CPU: Triton launches run nothing, and the ops take their kernel path for CPU
    tensors, except the contrastive loss, which keeps its reference (none of the cases
    here calls it; a launch that runs nothing would leave unset the hard negatives a
    pre-training step indexes with)."""
    return kernel_launches_intercepted(reference_modules=("contrastive",))


def cases(device: str, dtype: torch.dtype, width: int, ffn_width: int,
          vocabulary: int) -> list[tuple[str, Callable, Callable]]:
    """(name, blipfast call, PyTorch's equivalent) at tiny BLIP-like shapes: a batch of one
    35-token text, ``width`` features, an FFN of ``ffn_width``, ``vocabulary`` classes."""
    def tensor(*shape, grad=False, **kwargs):
        return torch.randn(*shape, device=device, dtype=kwargs.get("dtype", dtype),
                           requires_grad=grad)

    q, k, v = (tensor(1, 35, 12, 64, grad=True) for _ in range(3))
    mask = torch.ones(1, 35, dtype=torch.bool, device=device)
    sdpa_mask = torch.ones(1, 1, 35, 35, dtype=torch.bool, device=device).tril()
    x, residual = tensor(1, 35, width, grad=True), tensor(1, 35, width)
    weight, bias = tensor(width, dtype=torch.float32), tensor(width, dtype=torch.float32)
    hidden, gelu_bias = tensor(1, 35, ffn_width, grad=True), tensor(ffn_width)
    projection, projection_bias = tensor(width, ffn_width), tensor(width)
    logits = tensor(1, 35, vocabulary, grad=True)
    labels = torch.randint(0, vocabulary, (1, 35), device=device)

    def attention():
        return ops.attention(q, k, v, causal=True, key_padding_mask=mask)

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_mask=sdpa_mask)

    def layer_norm():
        return ops.layer_norm(x, weight, bias, residual=residual)

    def torch_layer_norm():
        return F.layer_norm(x + residual, (width,), weight.to(dtype), bias.to(dtype))

    def bias_gelu_linear():
        return ops.bias_gelu_linear(hidden, gelu_bias, projection, projection_bias)

    def torch_bias_gelu_linear():
        return F.linear(F.gelu(hidden + gelu_bias), projection, projection_bias)

    def cross_entropy():
        return ops.cross_entropy(logits[:, :-1], labels[:, 1:])

    def torch_cross_entropy():
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

    rows = []
    for name, ours, theirs, inputs in (
            ("attention (causal, padded)", attention, sdpa, [q, k, v]),
            ("layer_norm (residual)", layer_norm, torch_layer_norm, [x]),
            ("bias_gelu_linear", bias_gelu_linear, torch_bias_gelu_linear, [hidden]),
            ("cross_entropy", cross_entropy, torch_cross_entropy, [logits])):
        rows.append((f"{name} forward, no grad", torch.no_grad()(ours),
                     torch.no_grad()(theirs)))
        rows.append((f"{name} forward+backward", _backward(ours, inputs),
                     _backward(theirs, inputs)))
    return rows


def step_cases(device: str) -> list[tuple[str, Callable]]:
    """(name, one training step) for transformers eager, transformers patched by blipfast
    and blipfast's model, captioning, at BLIP-base depth and tiny widths."""
    import sys
    from pathlib import Path

    from transformers import BlipConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_models import _inputs, _loss, _models

    config = BlipConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=12, num_attention_heads=2,
                         max_position_embeddings=40, bos_token_id=97, sep_token_id=98,
                         eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=12,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_text_hidden_size=32)
    inputs = _inputs("captioning", config, 2, 35, device)
    rows = []
    for name, model in _models("captioning", config, device, False).items():
        model.train()

        def step(model=model):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = _loss("captioning", model, inputs)
            loss.backward()
            model.zero_grad(set_to_none=True)

        rows.append((f"captioning step, {name}", step))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=integer_at_least(1), default=2000,
                        help="calls timed per op (default: 2000)")
    parser.add_argument("--steps", type=integer_at_least(1), default=20,
                        help="training steps timed per model (default: 20)")
    arguments = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:  # BERT-base widths and vocabulary
        device, dtype, sizes = "cuda", torch.bfloat16, (768, 3072, 30524)
    else:  # small widths: the PyTorch work between the intercepted launches runs on CPU
        device, dtype, sizes = "cpu", torch.float32, (64, 256, 512)
    where = torch.cuda.get_device_name() if cuda else "CPU, kernel launches intercepted"
    if not cuda:
        # An intercepted kernel leaves its output as torch.empty made it; the PyTorch
        # matmuls after it then read that memory, and denormal garbage there slows a CPU
        # matmul several times over (bias_gelu_linear's no-grad forward measured 480 us
        # instead of 34): that would be timed as host time. Flushed for the whole run, so
        # the step table's transformers rows run under the same setting.
        torch.set_flush_denormal(True)
    print(f"host time per call, us ({where}; torch {torch.__version__})")
    print(f"{'call':48s} {'blipfast':>9s} {'PyTorch':>9s}")
    with contextlib.nullcontext() if cuda else _kernels_intercepted():
        for name, ours, theirs in cases(device, dtype, *sizes):
            ours_us = _per_call_microseconds(ours, arguments.calls, cuda)
            theirs_us = _per_call_microseconds(theirs, arguments.calls, cuda) if cuda else None
            print(f"{name:48s} {ours_us:9.1f} "
                  f"{'-' if theirs_us is None else f'{theirs_us:.1f}':>9s}", flush=True)
    print(f"\nhost time per training step, ms (BLIP-base depth, tiny widths, batch 2)")
    for name, step in step_cases(device):
        intercepted = "blipfast" in name and not cuda
        with _kernels_intercepted() if intercepted else contextlib.nullcontext():
            milliseconds = _per_call_microseconds(step, arguments.steps, cuda) / 1e3
        print(f"{name:58s} {milliseconds:8.2f}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # each line is printed as it is timed: those are what finished
        print("\nInterrupted (Ctrl-C): the lines above are what finished.", file=sys.stderr)
        sys.exit(130)
