"""``blipfast-demo``: run the fused attention at a small BLIP text-to-image shape, check it
against the PyTorch reference, and time it beside torch's scaled_dot_product_attention.

Works on CPU (reference path, or the Triton interpreter with ``TRITON_INTERPRET=1``) and on
CUDA (the Triton kernels, bf16). Exits with an error if the fused attention is further from
the float64 reference than its dtype allows.
"""

from __future__ import annotations

import argparse
import time

import torch

import blipfast
from blipfast import reference

# Largest allowed error against the float64 reference, by dtype: outputs are averages of
# standard normal values, so of order 1; a few units of the dtype's rounding.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
    the reference exceeds :data:`TOLERANCES`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=_positive_int, default=8,
                        help="texts (and images) per call (default 8)")
    parser.add_argument("--repeats", type=_positive_int, default=5,
                        help="timed calls of each implementation (default 5)")
    arguments = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, heads, len_text, len_image, head_dim = arguments.batch, 12, 35, 577, 64
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, len_text, heads, head_dim, generator=generator).to(device, dtype)
    k = torch.randn(batch, len_image, heads, head_dim, generator=generator).to(device, dtype)
    v = torch.randn(batch, len_image, heads, head_dim, generator=generator).to(device, dtype)
    lengths = torch.randint(5, len_text + 1, (batch,), generator=generator)
    text_mask = (torch.arange(len_text)[None] < lengths[:, None]).to(device)

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

    print(f"blipfast {blipfast.__version__} on {device} ({dtype}), torch {torch.__version__}")
    print(f"text->image cross attention ({batch}x{heads} heads, {len_text}->{len_image}, "
          f"D={head_dim}): max error vs float64 reference {cross_error:.2e}")
    print(f"causal padded text self-attention: max error vs reference {causal_error:.2e}")
    print(f"time per call: blipfast {_time_ms(fused, arguments.repeats):.3f} ms, "
          f"torch SDPA {_time_ms(sdpa, arguments.repeats):.3f} ms "
          "(a demo timing; see bench/ for measured comparisons)")
    worst = max(cross_error.item(), causal_error.item())
    if not worst <= TOLERANCES[dtype]:  # also catches NaN
        raise SystemExit(f"blipfast-demo: the fused attention is off by {worst:.3g}, more than "
                         f"the {TOLERANCES[dtype]:g} allowed in {dtype}")


if __name__ == "__main__":
    main()
