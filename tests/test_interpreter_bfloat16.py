"""bfloat16 on the Triton interpreter outside the test suite's patches: the ops refuse it
where the interpreter would compute it wrong, rather than return silently wrong answers.

The test processes patch the interpreter's bf16 (``interpreter_like_gpu.py``); a user's
process with ``TRITON_INTERPRET=1`` does not. The unpatched check runs in a fresh Python
process with the interpreter on and none of the suite's patches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blipfast.kernels._interpreter import bfloat16_is_exact
from blipfast.ops._dispatch import use_triton

REPOSITORY = Path(__file__).resolve().parents[1]

_UNPATCHED = r"""
import json
import torch
from blipfast import ops, reference
from blipfast.kernels._interpreter import bfloat16_is_exact
from blipfast.kernels.attention import fused_attention

generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 16, 1, 16, generator=generator).bfloat16() for _ in range(3))
expected = reference.attention(q.float(), k.float(), v.float())
# The kernel itself, past the op's check: how wrong the unpatched interpreter is.
direct_error = (fused_attention(q, k, v, None, None, False, 0.25).float()
                - expected).abs().max().item()
report = {"exact": bfloat16_is_exact(), "direct_error": direct_error}
for name, call in {
    "attention": lambda: ops.attention(q, k, v, softmax_scale=0.25),
    "layer_norm": lambda: ops.layer_norm(q[0, :, 0], None, None),
    "bias_gelu": lambda: ops.bias_gelu(q[0, :, 0], None),
    "contrastive_loss": lambda: ops.contrastive_loss(q[0, :, 0], k[0, :, 0],
                                                     torch.tensor(2.0)),
    # traced, the probe runs as plain Python (its verdict a constant of the graph)
    "compiled bias_gelu": lambda: torch.compile(ops.bias_gelu, backend="aot_eager")(
        q[0, :, 0], None),
}.items():
    try:
        result = call()
        report[name] = ("ran", bool(torch.isfinite(result).all()))
    except RuntimeError as error:
        report[name] = ("raised", str(error))
report["float32_attention_error"] = (
    ops.attention(q.float(), k.float(), v.float(), softmax_scale=0.25)
    - reference.attention(q.float(), k.float(), v.float(), softmax_scale=0.25)
).abs().max().item()
print(json.dumps(report))
"""


@pytest.mark.interpreter
def test_unpatched_interpreter_refuses_bfloat16_it_would_compute_wrong():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    environment.pop("BLIPFAST_TEST_SEED", None)
    result = subprocess.run([sys.executable, "-c", _UNPATCHED], cwd=REPOSITORY,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The probe's verdict agrees with what the kernel actually does in bf16.
    assert report["exact"] == (report["direct_error"] < 0.05), report
    for name in ("attention", "layer_norm", "bias_gelu", "contrastive_loss",
                 "compiled bias_gelu"):
        outcome, detail = report[name]
        if report["exact"]:
            assert outcome == "ran" and detail, (name, report)
        else:
            assert outcome == "raised", (name, report)
            op = name.removeprefix("compiled ")
            assert detail.startswith(op) and "TRITON_INTERPRET" in detail, detail
    assert report["float32_attention_error"] < 1e-5, report  # float32 is unaffected


@pytest.mark.interpreter
def test_the_suites_patched_interpreter_passes_the_probe():
    """The tests' interpreter computes bf16 as a GPU does, so bf16 kernel tests run."""
    assert bfloat16_is_exact()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the probe's yardstick stays float32
        assert bfloat16_is_exact()
    assert use_triton(torch.device("cpu"), torch.zeros(1, dtype=torch.bfloat16), op="test")


@pytest.mark.interpreter
def test_the_probe_runs_untraced_under_torch_compile(monkeypatch):
    """A bf16 op compiled before any eager bf16 call (the probe's verdict not yet cached):
    the probe runs as plain Python while the graph is traced, not traced into it, and
    the compiled op (one graph) gives the eager result."""
    from blipfast import ops
    from blipfast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_interpreter_bfloat16_checked", False)
    torch._dynamo.reset()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    bias = torch.randn(64, generator=torch.Generator().manual_seed(6)).bfloat16()
    compiled = torch.compile(ops.bias_gelu, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, bias), ops.bias_gelu(x, bias))
    assert _dispatch._interpreter_bfloat16_checked
    torch._dynamo.reset()
