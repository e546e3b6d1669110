"""Registers, spills and memory instructions of the Triton kernels on sm90, without a GPU.

Calls each op's launchers, as the ops call them, on CPU tensors of the BLIP shapes, with
the kernel launch intercepted: each launch is compiled for an H100 target exactly as the
JIT would compile it on the GPU (the same tile configuration, and the same argument
specialization: integer arguments equal to 1 become constants, arguments and pointers
divisible by 16 carry that hint). Then the ptxas that ships with Triton runs with ``-v``.
Each row gives registers per thread, spill bytes, the width of the global loads and
stores (bytes per thread per instruction: 16 is a full vector, 2 a single bf16), the
matrix instruction (``wgmma`` is Hopper's; ``mma`` the older one), the shared memory per
program and how many programs fit on one multiprocessor at once (by registers, warps and
shared memory: what hides memory latency in the memory-bound shapes). Spills and narrow
loads are strong hints of a slow kernel; this is a proxy to steer tuning when no GPU is at
hand, never a timing.

    python bench/register_report.py                 # every op
    python bench/register_report.py --op contrastive

Uses whichever Triton is installed; run it with the GPU machine's Triton 3.6 (e.g.
``python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install
triton==3.6.0``): the ptxas bundled with Triton 3.9 exits with an error on this PTX.
Needs Triton's NVIDIA backend (bundled with the pip wheel), not a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Callable, Iterator
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100: sm90, 32 threads per warp
H100_MULTIPROCESSORS = 132  # H100 SXM


# --------------------------------------------------------------------------------------
# Launch capture and compilation
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_launches() -> Iterator[list[tuple[JITFunction, tuple, dict]]]:
    """Within it, ``kernel[grid](*args, **kwargs)`` launches nothing and records
    ``(kernel, args, kwargs)`` in the yielded list instead."""
    launches: list[tuple[JITFunction, tuple, dict]] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel, args, kwargs))

    with mock.patch.object(JITFunction, "run", record):
        yield launches


def launch_specialization(kernel: JITFunction, args: tuple, kwargs: dict,
                          target: GPUTarget = TARGET) -> tuple:
    """(signature, constexprs, attrs, options) of one recorded launch as the JIT would
    compile it for ``target``: its own binder turns the arguments into the
    specialization (constants, divisibility hints)."""
    # the options JITFunction.run adds before binding (Triton 3.6)
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict):
    """Compile one recorded launch for sm90 as the JIT would on the GPU."""
    signature, constexprs, attrs, options = launch_specialization(kernel, args, kwargs)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                          options=options.__dict__)


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


class PtxasError(RuntimeError):
    """ptxas could not be run or failed on a kernel's PTX; the message holds its output."""


def _ptxas_usage(ptx: str) -> tuple[str, int | None]:
    """("R regs, spill S/L B", R) from ``ptxas -v`` on ``ptx``. Raises
    :class:`PtxasError`, with ptxas's own error output, when it fails."""
    ptxas = _ptxas()
    with tempfile.TemporaryDirectory() as directory:
        ptx_path = os.path.join(directory, "kernel.ptx")
        with open(ptx_path, "w") as handle:
            handle.write(ptx)
        try:
            result = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx_path, "-o",
                                     os.path.join(directory, "kernel.o")],
                                    capture_output=True, text=True)
        except OSError as error:
            raise PtxasError(f"cannot run {ptxas} ({error}); this needs Triton's NVIDIA "
                             "backend (bundled with the pip wheel)") from error
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip() or "(no output)"
        raise PtxasError(f"{ptxas} exited with status {result.returncode}:\n{output}")
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    text = (f"{registers.group(1) if registers else '?'} regs, "
            f"spill {spills.group(1) if spills else '?'}/{spills.group(2) if spills else '?'} B")
    return text, int(registers.group(1)) if registers else None


# An H100 multiprocessor's limits (CUDA occupancy rules for compute capability 9.0).
SM_REGISTERS = 65536
SM_WARPS = 64
SM_BLOCKS = 32
SM_SHARED_BYTES = 228 * 1024
SHARED_BYTES_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_THREAD_STEP = 8  # registers are allocated per warp, 256 (8 per thread) at a time


def blocks_per_multiprocessor(registers: int, warps: int, shared_bytes: int) -> int:
    """How many programs of a kernel one H100 multiprocessor holds at once: the least of
    what its registers, warp slots, block slots and shared memory allow. Resident
    programs are what hides memory latency, so for the memory-bound shapes this bounds
    the bytes in flight."""
    per_thread = -(-registers // REGISTERS_PER_THREAD_STEP) * REGISTERS_PER_THREAD_STEP
    by_registers = SM_REGISTERS // (per_thread * 32 * warps)
    by_shared = SM_SHARED_BYTES // (shared_bytes + SHARED_BYTES_RESERVED_PER_BLOCK)
    return min(by_registers, SM_WARPS // warps, SM_BLOCKS, by_shared)


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")
_ASYNC_COPY = re.compile(r"\bcp\.async\.\w+\.shared\.global\s+\[[^\]]*\],\s*\[[^\]]*\],\s*"
                         r"(0x[0-9a-fA-F]+|\d+)")


def memory_widths(ptx: str) -> dict[str, Counter]:
    """Bytes per thread of each global load ("ld", including asynchronous copies to
    shared memory) and store ("st") instruction in ``ptx``: {"ld": Counter({16: 4, ...})}."""
    widths = {"ld": Counter(), "st": Counter()}
    for kind, suffix in _GLOBAL_ACCESS.findall(ptx):
        parts = suffix.strip(".").split(".")
        lanes = next((int(part[1:]) for part in parts if re.fullmatch(r"v\d+", part)), 1)
        bits = next((int(part[1:]) for part in parts if re.fullmatch(r"[bsuf]\d+", part)), 0)
        widths[kind][lanes * bits // 8] += 1
    for size in _ASYNC_COPY.findall(ptx):
        widths["ld"][int(size, 0)] += 1
    if "cp.async.bulk.tensor" in ptx:
        widths["ld"]["TMA"] += 1
    return widths


def _widths_text(widths: Counter) -> str:
    """"16Bx20 4Bx2": widest first (a "TMA" entry, which has no width, after them)."""
    def widest_first(item):
        return -item[0] if isinstance(item[0], int) else 0
    return " ".join(f"{width}Bx{count}"
                    for width, count in sorted(widths.items(), key=widest_first))


def launch_report(kernel: JITFunction, args: tuple, kwargs: dict) -> str:
    """Registers, spills, global access widths, matrix instruction and programs per
    multiprocessor of one launch."""
    compiled = compile_launch(kernel, args, kwargs)
    ptx = compiled.asm["ptx"]
    widths = memory_widths(ptx)
    matrix = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    usage, registers = _ptxas_usage(ptx)
    warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    resident = "?" if registers is None else blocks_per_multiprocessor(registers, warps, shared)
    return (f"{usage}; ld {_widths_text(widths['ld']) or '-'}; "
            f"st {_widths_text(widths['st']) or '-'}; {matrix}; "
            f"{shared // 1024} KiB shared; {resident} per SM")


def _launch_label(kernel: JITFunction, kwargs: dict, shape_label: str) -> str:
    """The kernel's name, the shape, the flags that are on and the tile sizes."""
    flags = [key for key, value in kwargs.items() if value is True]
    tiles = {key: value for key, value in kwargs.items()
             if key.startswith("BLOCK") or key in ("num_warps", "num_stages")}
    return f"{kernel.fn.__name__} {shape_label} {'+'.join(flags) or '-'} {tiles}"


def report_launches(shape_label: str, run: Callable[[], object]) -> list[tuple[str, str]]:
    """Run ``run`` (which calls launchers) with launches captured; one report row per
    distinct kernel launch it made."""
    with captured_launches() as launches:
        run()
    rows = {}
    for kernel, args, kwargs in launches:
        label = _launch_label(kernel, kwargs, shape_label)
        if label not in rows:
            rows[label] = launch_report(kernel, args, kwargs)
    return list(rows.items())


def _empty(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype)


# --------------------------------------------------------------------------------------
# The ops at BLIP shapes
# --------------------------------------------------------------------------------------


def _heads(batch: int, length: int, heads: int, head_dim: int, packed: int):
    """``packed`` (batch, length, heads, head_dim) views of one projection output, as a
    fused QKV (3) or a single (1) projection produces them."""
    projection = _empty(batch, length, packed * heads * head_dim)
    return projection.view(batch, length, packed, heads, head_dim).unbind(2)


def attention_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import attention as kernels

    batch = 2  # the grid's size does not change the compiled kernel
    # (name, Lq, Lk, heads, head dim, causal, key mask, kv_index, variant): the default
    # configs, "split" (the forward with SPLIT_HEAD_DIM), "tails" (16-long sequence
    # tails, forward and backward) or "query tail" (32-long query tiles and a 16-long
    # query tail, 4 warps: 35 queries as 32 + 16, the 35 keys one tile).
    shapes = [("text bidirectional padded", 35, 35, 12, 64, False, True, False, None),
              ("text bidirectional padded query tail", 35, 35, 12, 64, False, True, False,
               "query tail"),
              ("text causal padded", 35, 35, 12, 64, True, True, False, None),
              ("text->image cross", 35, 577, 12, 64, False, False, False, None),
              ("3 texts->image cross kv_index", 35, 577, 12, 64, False, False, True, None),
              ("ViT-B self", 577, 577, 12, 64, False, False, False, None),
              ("ViT-B self tails", 577, 577, 12, 64, False, False, False, "tails"),
              ("ViT-g self", 257, 257, 16, 88, False, False, False, None),
              ("ViT-g self split head dim", 257, 257, 16, 88, False, False, False, "split"),
              ("ViT-g self tails", 257, 257, 16, 88, False, False, False, "tails"),
              ("Q-Former cross", 32, 257, 12, 64, False, False, False, None),
              ("Q-Former cross tails", 32, 257, 12, 64, False, False, False, "tails")]
    overrides = {"tails": dict(BLOCK_M_TAIL=16, BLOCK_N_TAIL=16),
                 "query tail": dict(BLOCK_M=32, BLOCK_M_TAIL=16, num_warps=4)}
    rows = []
    for name, len_q, len_k, heads, head_dim, causal, masked, indexed, variant in shapes:
        query_batch = 3 * batch if indexed else batch
        if len_q == len_k and not indexed:
            q, k, v = _heads(batch, len_q, heads, head_dim, 3)
        else:
            (q,) = _heads(query_batch, len_q, heads, head_dim, 1)
            k, v = _heads(batch, len_k, heads, head_dim, 2)
        mask = torch.ones(batch, len_k, dtype=torch.bool) if masked else None
        kv_index = torch.arange(query_batch) % batch if indexed else None
        scale = head_dim ** -0.5

        def run():
            forward_config = backward_config = None
            if variant == "split":
                forward_config = dict(kernels._forward_config(len_q, len_k, head_dim),
                                      SPLIT_HEAD_DIM=True)
            elif variant in overrides:
                forward_config = dict(kernels._forward_config(len_q, len_k, head_dim),
                                      **overrides[variant])
                backward_config = dict(kernels._backward_config(len_q, len_k, head_dim),
                                       **overrides[variant])
            out, log_sum_exp = kernels.attention_forward(q, k, v, mask, kv_index, causal,
                                                         scale, forward_config)
            if variant != "split":  # the split applies to the forward only
                kernels.attention_backward(torch.empty_like(out), q, k, v, out, log_sum_exp,
                                           mask, kv_index, causal, scale, backward_config)

        rows += report_launches(name, run)
    return rows


def contrastive_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import contrastive as kernels

    rows = []
    for queries, feature_dim in ((1, 256), (32, 256), (1, 64)):
        count = 4096
        row_feat = _empty(count, queries, feature_dim) if queries > 1 \
            else _empty(count, feature_dim)
        column_feat = _empty(count, feature_dim)
        scale = torch.ones(1)
        ids = torch.arange(count)

        def run():
            stats = kernels.contrastive_forward(row_feat, column_feat, scale, ids, ids)
            kernels.contrastive_forward(row_feat, column_feat, scale, ids, ids,
                                        seed=torch.zeros(1, dtype=torch.int64))
            kernels.contrastive_backward(torch.ones(count), torch.ones(count), row_feat,
                                         column_feat, scale, ids, ids, stats[0], stats[1])
            if queries == 1:  # the queue form: momentum features as distillation targets
                stats = kernels.contrastive_forward(row_feat, column_feat, scale, ids, ids,
                                                    teacher_feat=column_feat,
                                                    column_term=False, alpha=0.4)
                kernels.contrastive_backward(torch.ones(count), None, row_feat, column_feat,
                                             scale, ids, ids, stats[0], stats[1],
                                             teacher_feat=column_feat, alpha=0.4,
                                             need_column_grad=False)

        rows += report_launches(f"N={count} Q={queries} D={feature_dim}", run)
    return rows


def layer_norm_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import layer_norm as kernels

    rows = []
    # BERT/ViT-B, ViT-L, ViT-g hidden sizes over a batch of 64 ViT sequences at 384 px;
    # float32 parameters with bf16 activations, as under autocast
    for features in (768, 1024, 1408):
        x, residual = _empty(64 * 577, features), _empty(64 * 577, features)
        weight, bias = _empty(features, dtype=torch.float32), _empty(features,
                                                                       dtype=torch.float32)

        def run():
            y, total, mean, rstd = kernels.layer_norm_forward(x, residual, weight, bias, 1e-6,
                                                              True)
            kernels.layer_norm_backward(torch.empty_like(y), torch.empty_like(y), total, None,
                                        weight, bias, mean, rstd, True, True)

        with mock.patch.object(kernels, "_multiprocessors", lambda device: H100_MULTIPROCESSORS):
            rows += report_launches(f"N={features}", run)
    return rows


def bias_gelu_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import bias_gelu as kernels

    rows = []
    # ViT-B / BERT FFN (3072) and ViT-g FFN (6144) over 64 ViT sequences at 384 px
    for columns in (3072, 6144):
        x, bias = _empty(64 * 577, columns), _empty(columns)

        def run():
            out = kernels.bias_gelu_forward(x, bias)
            kernels.bias_gelu_backward(torch.empty_like(out), x, bias, True, True)

        rows += report_launches(f"N={columns}", run)
    return rows


def cross_entropy_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import cross_entropy as kernels

    # BERT's vocabulary (BLIP's text decoder), the shifted logits of a batch of 64 captions
    # of 35 tokens read in place; OPT / Flan-T5 vocabularies come with BLIP-2
    logits = _empty(64, 35, 30524)[:, :-1]
    labels = torch.zeros(64, 35, dtype=torch.int64)[:, 1:]

    def run():
        loss, log_sum_exp = kernels.cross_entropy_forward(logits, labels, -100, 0.1)
        kernels.cross_entropy_backward(torch.ones(()).expand(labels.shape), logits, labels,
                                       log_sum_exp, -100, 0.1)

    return report_launches("V=30524", run)


REPORTS = {"attention": attention_rows, "contrastive": contrastive_rows,
           "layer_norm": layer_norm_rows, "bias_gelu": bias_gelu_rows,
           "cross_entropy": cross_entropy_rows}


def main(arguments: list[str] | None = None) -> int:
    """Print the report of the chosen ops; 1 (with ptxas's error) if ptxas fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=(*REPORTS, "all"), default="all")
    options = parser.parse_args(arguments)
    print(f"triton {triton.__version__}, target sm90 (ptxas -v); ld/st: bytes per thread "
          "per global access instruction x static count")
    for name, report in REPORTS.items():
        if options.op in (name, "all"):
            try:
                rows = report()
            except PtxasError as error:
                print(f"error: ptxas failed on a {name} kernel (Triton {triton.__version__}; "
                      f"the GPU machine's Triton 3.6 is known to work, the ptxas bundled "
                      f"with 3.9 fails on this PTX):\n{error}", file=sys.stderr)
                return 1
            for label, result in rows:
                print(f"{result}\n    {label}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
