"""Registers and spills of the Triton kernels on sm90, without a GPU.

Compiles each kernel at the tile configuration its heuristic picks for the BLIP shapes
(Triton front end -> PTX for an H100 target), runs the ptxas that ships with Triton with
``-v`` and prints registers per thread and spill bytes. Spills are a strong hint of a slow
tile choice; this is a proxy to steer tuning when no GPU is at hand, never a timing.

    python bench/register_report.py                 # every op
    python bench/register_report.py --op contrastive

Uses whichever Triton is installed; run it with the GPU machine's Triton 3.6 (e.g.
``python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install
triton==3.6.0``): the ptxas bundled with Triton 3.9 exits with an error on this PTX.
Needs Triton's NVIDIA backend (bundled with the pip wheel), not a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 128)
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def compile_report(kernel, pointer_types: dict[str, str], constants: dict) -> str:
    """Compile ``kernel`` with ``constants`` (constexprs plus num_warps/num_stages) and
    return "registers / spill stores / spill loads". Pointer params not named in
    ``pointer_types`` are bf16; float scalars must be named there as "fp32"; other
    params are i32."""
    options = {key: constants[key] for key in LAUNCH_OPTIONS}
    constexprs = {key: value for key, value in constants.items() if key not in LAUNCH_OPTIONS}
    signature = {}
    for param in kernel.params:
        if param.name in constexprs:
            signature[param.name] = "constexpr"
        elif param.name in pointer_types:
            signature[param.name] = pointer_types[param.name]
        elif param.name[0].isupper() or param.name.endswith("_ptr"):
            signature[param.name] = "*bf16"
        else:
            signature[param.name] = "i32"
    positions = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    compiled = triton.compile(ASTSource(kernel, signature, positions), target=TARGET,
                              options=options)
    with tempfile.TemporaryDirectory() as directory:
        ptx_path = os.path.join(directory, "kernel.ptx")
        with open(ptx_path, "w") as handle:
            handle.write(compiled.asm["ptx"])
        result = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", ptx_path, "-o",
                                 os.path.join(directory, "kernel.o")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (f"{registers.group(1) if registers else '?'} regs, "
            f"spill {spills.group(1)}/{spills.group(2) if spills else '?'} B")


def contrastive_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import contrastive as kernels

    types = {"row_ids_ptr": "*i64", "column_ids_ptr": "*i64", "seed_ptr": "*i64",
             "negative_ptr": "*i64", "alpha": "fp32", "label_smoothing": "fp32"}
    for name in ("scale_ptr", "stats_ptr", "row_stats_ptr", "column_stats_ptr",
                 "grad_row_loss_ptr", "grad_column_loss_ptr", "normalizer_ptr"):
        types[name] = "*fp32"
    variants = [
        (kernels._row_stats_kernel, dict(DISTILL=False, SAMPLE=False)),
        (kernels._row_stats_kernel, dict(DISTILL=False, SAMPLE=True)),
        (kernels._column_stats_kernel, dict(SAMPLE=False)),
        (kernels._row_grad_kernel, dict(ROW_TERM=True, COLUMN_TERM=True, DISTILL=False)),
        (kernels._column_grad_kernel, dict(ROW_TERM=True, COLUMN_TERM=True)),
    ]
    rows = []
    for queries, feature_dim in ((1, 256), (32, 256), (1, 64)):
        config = kernels._tile_config(queries, feature_dim)
        for kernel, flags in variants:
            constants = dict(config, QUERIES=queries, FEATURE_DIM=feature_dim,
                             DOT_PRECISION="tf32", **flags)
            label = f"{kernel.fn.__name__} Q={queries} D={feature_dim} {flags} {config}"
            rows.append((label, compile_report(kernel, types, constants)))
    return rows


def attention_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import attention as kernels

    types = {"LogSumExp": "*fp32", "Delta": "*fp32", "KeyMask": "*u8", "KvIndex": "*i64",
             "QueryBatchOrder": "*i64", "QueryBatchOffsets": "*i64", "scale_log2": "fp32",
             "scale": "fp32"}
    # (name, Lq, Lk, head dim, causal, key mask, forward head-dim split)
    shapes = [("text causal padded", 35, 35, 64, True, True, False),
              ("text->image cross", 35, 577, 64, False, False, False),
              ("ViT-B self", 577, 577, 64, False, False, False),
              ("ViT-g self", 257, 257, 88, False, False, False),
              ("ViT-g self split head dim", 257, 257, 88, False, False, True)]
    rows = []
    for name, len_q, len_k, head_dim, causal, masked, split in shapes:
        flags = dict(CAUSAL=causal, HAS_KEY_MASK=masked, HAS_KV_INDEX=False,
                     DOT_PRECISION="tf32", HEAD_DIM=head_dim)
        forward = dict(kernels._forward_config(len_q, len_k, head_dim), **flags)
        del forward["SPLIT_HEAD_DIM"]  # this row's split decides instead
        forward["BLOCK_D"], forward["BLOCK_D_TAIL"] = kernels._forward_head_dim_blocks(
            head_dim, split)
        backward = dict(kernels._backward_config(len_q, len_k, head_dim), **flags,
                        BLOCK_D=kernels._block_d(head_dim))
        single = len_k <= backward["BLOCK_N"]
        runs = [(kernels._attention_forward_kernel, forward)]
        if not split:  # the split applies to the forward only
            runs.append((kernels._attention_backward_dkdv_kernel,
                         dict(backward, SINGLE_KEY_BLOCK=single)))
            if not single:
                runs.insert(1, (kernels._attention_backward_dq_kernel, backward))
        for kernel, constants in runs:
            tiles = {key: constants[key] for key in ("BLOCK_M", "BLOCK_N", *LAUNCH_OPTIONS)}
            if constants.get("BLOCK_D_TAIL"):
                tiles["BLOCK_D"] = f'{constants["BLOCK_D"]}+{constants["BLOCK_D_TAIL"]}'
            rows.append((f"{kernel.fn.__name__} {name} {tiles}",
                         compile_report(kernel, types, constants)))
    return rows


def _tiled_kernel_rows(runs, tile_keys: tuple[str, ...], shape_label: str,
                       types: dict[str, str]) -> list[tuple[str, str]]:
    """One report row per (kernel, constants) of ``runs``: the kernel's name, the shape
    and the constants named by ``tile_keys``, and its :func:`compile_report`."""
    rows = []
    for kernel, constants in runs:
        tiles = {key: constants[key] for key in tile_keys}
        rows.append((f"{kernel.fn.__name__} {shape_label} {tiles}",
                     compile_report(kernel, types, constants)))
    return rows


def layer_norm_rows() -> list[tuple[str, str]]:
    from unittest import mock

    from blipfast.kernels import layer_norm as kernels

    types = {"Mean": "*fp32", "Rstd": "*fp32", "PartialWeight": "*fp32",
             "PartialBias": "*fp32", "eps": "fp32"}
    rows = []
    # BERT/ViT-B, ViT-L, ViT-g hidden sizes over a batch of 64 ViT sequences at 384 px
    for features in (768, 1024, 1408):
        forward = dict(kernels._forward_config(64 * 577, features), HAS_RESIDUAL=True,
                       HAS_WEIGHT=True, HAS_BIAS=True, STORE_SUM=True, num_stages=1)
        with mock.patch.object(kernels, "_multiprocessors", lambda device: 132):  # H100 SXM
            backward = kernels._backward_config(64 * 577, features, None)
        backward = dict(backward, HAS_GRAD_SUM=True, HAS_RESIDUAL=True, HAS_WEIGHT=True,
                        WEIGHT_GRAD=True, BIAS_GRAD=True, num_stages=1)
        backward.pop("programs")
        rows += _tiled_kernel_rows(
            ((kernels._layer_norm_forward_kernel, forward),
             (kernels._layer_norm_backward_kernel, backward)),
            ("BLOCK_M", "BLOCK_N", "num_warps"), f"N={features}", types)
    return rows


def bias_gelu_rows() -> list[tuple[str, str]]:
    from blipfast.kernels import bias_gelu as kernels

    types = {"PartialGradBias": "*fp32"}
    rows = []
    # ViT-B / BERT FFN (3072) and ViT-g FFN (6144) over 64 ViT sequences at 384 px
    for columns in (3072, 6144):
        forward = dict(kernels._forward_config(64 * 577, columns), HAS_BIAS=True, num_stages=1)
        backward = dict(kernels._backward_config(64 * 577, columns), HAS_BIAS=True,
                        BIAS_GRAD=True, STORE_ACTIVATION=True, num_stages=1)
        backward.pop("rows_per_program")
        rows += _tiled_kernel_rows(
            ((kernels._bias_gelu_forward_kernel, forward),
             (kernels._bias_gelu_backward_kernel, backward)),
            ("BLOCK_ROWS", "BLOCK_N", "num_warps"), f"N={columns}", types)
    return rows


def cross_entropy_rows() -> list[tuple[str, str]]:
    from unittest import mock

    from blipfast.kernels import cross_entropy as kernels

    types = {"Labels": "*i64", "Loss": "*fp32", "LogSumExp": "*fp32", "RowScale": "*fp32",
             "label_smoothing": "fp32"}
    # BERT's vocabulary (BLIP's text decoder); OPT / Flan-T5 vocabularies come with BLIP-2
    with mock.patch.object(kernels, "interpreter_enabled", lambda: False):
        block_v = kernels._block_v(30524)
        constants = dict(BLOCK_V=block_v, num_warps=kernels._warps(block_v), num_stages=1)
    return _tiled_kernel_rows(
        ((kernels._cross_entropy_forward_kernel, constants),
         (kernels._cross_entropy_backward_kernel, constants)),
        ("BLOCK_V", "num_warps", "num_stages"), "V=30524", types)


REPORTS = {"attention": attention_rows, "contrastive": contrastive_rows,
           "layer_norm": layer_norm_rows, "bias_gelu": bias_gelu_rows,
           "cross_entropy": cross_entropy_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=(*REPORTS, "all"), default="all")
    arguments = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"triton {triton.__version__}, target sm90 (ptxas -v)")
    rows = []
    for name, report in REPORTS.items():
        if arguments.op in (name, "all"):
            rows += report()
    for label, report in rows:
        print(f"{report:>28}  {label}")


if __name__ == "__main__":
    main()
