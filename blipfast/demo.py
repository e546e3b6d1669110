"""``blipfast-demo``: run the fused attention at a small BLIP text-to-image shape, check it
against the PyTorch reference, and time it beside torch's scaled_dot_product_attention.

Works on CUDA (the Triton kernels, bf16) and on CPU: with ``TRITON_INTERPRET=1`` the Triton
kernels run on Triton's interpreter (slow); without it ``blipfast.ops.attention`` takes its
PyTorch reference fallback, so no kernel runs, and the demo says so (its check then only
compares the float32 reference with the float64 one). The output names the path that ran.
Exits with an error if the attention is further from the float64 reference than its dtype
allows, and with status 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import blipfast
from blipfast import reference
from blipfast.kernels._runtime import interpreter_enabled
from blipfast.ops._dispatch import use_triton

# Largest allowed error against the float64 reference, by dtype: outputs are averages of
# standard normal values, so of order 1; a few units of the dtype's rounding.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _attention_path(device: torch.device) -> str:
    """Which implementation ``blipfast.ops.attention`` runs for float32/bf16 tensors on
    ``device`` (its own dispatch: :func:`blipfast.ops._dispatch.use_triton`)."""
    if not use_triton(device):
        return "PyTorch reference fallback"
    # (with TRITON_INTERPRET=1 Triton interprets the kernels, CUDA tensors included)
    return "Triton interpreter" if interpreter_enabled() else "Triton kernel on GPU"


def _time_ms(function, repeats: int) -> float:
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / repeats


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``blipfast-demo`` console script (``argv``: its arguments,
    default the command line). Raises ``SystemExit`` with a message if an error against
    the reference exceeds :data:`TOLERANCES`, and ``SystemExit(130)`` after one line on
    stderr on Ctrl-C (KeyboardInterrupt)."""
    parser = argparse.ArgumentParser(prog="blipfast-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=_positive_int, default=8, metavar="N",
                        help="texts (and images) per call, a positive integer (default 8)")
    parser.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                        help="timed calls of each implementation, a positive integer "
                             "(default 5)")
    arguments = parser.parse_args(argv)
    try:
        _run(arguments.batch, arguments.repeats)
    except KeyboardInterrupt:
        print("blipfast-demo: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _run(batch: int, repeats: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = _attention_path(device)
    heads, len_text, len_image, head_dim = 12, 35, 577, 64
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, len_text, heads, head_dim, generator=generator).to(device, dtype)
    k = torch.randn(batch, len_image, heads, head_dim, generator=generator).to(device, dtype)
    v = torch.randn(batch, len_image, heads, head_dim, generator=generator).to(device, dtype)
    lengths = torch.randint(5, len_text + 1, (batch,), generator=generator)
    text_mask = (torch.arange(len_text)[None] < lengths[:, None]).to(device)

    print(f"blipfast {blipfast.__version__} on {device.type} ({dtype}), torch {torch.__version__}")
    if path == "PyTorch reference fallback":
        print(f"attention path: {path} (no GPU, TRITON_INTERPRET unset or 0): no Triton kernel "
              "runs, so the errors below compare the float32 PyTorch reference with the "
              "float64 one, not a kernel; set TRITON_INTERPRET=1 to check the kernels on "
              "the Triton interpreter (slow)")
    else:
        print(f"attention path: {path}")

    cross = blipfast.ops.attention(q, k, v)
    causal = blipfast.ops.attention(q, q, q, causal=True, key_padding_mask=text_mask)
    cross_error = (cross.float() - reference.attention(q.double(), k.double(), v.double())).abs().max()
    causal_error = (causal.float() - reference.attention(
        q.double(), q.double(), q.double(), causal=True, key_padding_mask=text_mask)).abs().max()

    def fused():
        return blipfast.ops.attention(q, k, v)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    print(f"text->image cross attention ({batch}x{heads} heads, {len_text}->{len_image}, "
          f"D={head_dim}): max error vs float64 reference {cross_error:.2e}")
    print(f"causal padded text self-attention: max error vs reference {causal_error:.2e}")
    print(f"time per call: blipfast.ops.attention ({path}) "
          f"{_time_ms(fused, repeats):.3f} ms, torch SDPA {_time_ms(sdpa, repeats):.3f} ms "
          "(a demo timing; see bench/ for measured comparisons)")
    worst = max(cross_error.item(), causal_error.item())
    if not worst <= TOLERANCES[dtype]:  # also catches NaN
        raise SystemExit(f"blipfast-demo: blipfast.ops.attention ({path}) is off by "
                         f"{worst:.3g}, more than the {TOLERANCES[dtype]:g} allowed in {dtype}")


if __name__ == "__main__":
    main()
