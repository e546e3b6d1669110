"""Activation census: what one BLIP training step keeps for its backward, counted on the CPU.

An estimate of the activation memory of one training step, without a GPU, to see which
saved tensors dominate peak memory. For each step (``captioning``, ``itm``, ``itc``, as
``bench/run_models.py`` defines them) and each implementation run_models compares
(transformers eager, transformers patched by ``blipfast.patch``, blipfast's own model,
same weights), it runs the forward and the loss once on the CPU, under bf16 autocast,
and reports:

- activations: every tensor autograd saved for the backward, counted once per storage
  (views of one buffer are one buffer), attributed to the innermost module running when
  it was saved and to the autograd node that saved it, grouped by module path with layer
  indices replaced by ``*``, shape and dtype; scaled from the census batch to batch 64;
- weight casts: saved bf16 copies that autocast made of parameters (fixed size, not
  scaled);
- parameters + gradients + AdamW states: 4 bytes per parameter, plus 12 per parameter the
  loss reaches (fp32 gradient and two fp32 AdamW moments), as run_models trains;
- estimated total = the three above, the memory held when the backward starts. Compare it
  with the GPU peak of ``run_models.py`` (19.1 GB for transformers eager captioning at
  batch 64 on an H100).

How:
- saved tensors: ``torch.autograd.graph.saved_tensors_hooks`` wraps every saved tensor in
  a record. After the loss, a walk of the autograd graph from the loss unpacks the saved
  tensors of every node the backward would run; a record unpacked by the walk is counted
  (with the node's name), one never unpacked belongs to a part of the graph the backward
  does not reach and is not. Parameters and buffers (by storage) are never activations; a
  saved tensor reached from a parameter through casts and views only is a weight cast.
- modules: global forward pre- and post-hooks keep the stack of the model's modules that
  are running. blipfast calls its LayerNorm modules' parameters directly rather than the
  modules, so its LayerNorm saves are attributed to the enclosing block; the "saved by"
  column (``LayerNormFunctionBackward``) tells them apart.
- Triton: the kernels cannot run on the CPU at this size (the interpreter is far too
  slow), but what a blipfast op saves is decided by its ``autograd.Function``, not by the
  kernel. :func:`triton_stand_ins` makes ``use_triton`` true for the CPU and replaces each
  forward launcher (attention, residual-add + LayerNorm, bias + GELU, cross-entropy,
  contrastive) by PyTorch code that returns tensors of the kernel's shapes, dtypes and
  values, so the eager ``autograd.Function`` path runs and saves exactly what it would on
  the GPU.
  blipfast's recomputation of activations in the backward (``recompute_in_backward``) is
  told to pass the census's hooks every saved tensor but the ones it recomputes.
  Backward launchers are not replaced: no backward runs here. The contrastive stand-in
  is not reached by these steps (run_models' ITC loss is PyTorch cross-entropy on the
  similarity matrix); it keeps the stand-ins complete for any caller of the ops.
- Autocast: CPU autocast keeps softmax, log_softmax and layer_norm in the input's dtype;
  CUDA autocast (the benchmark's) runs them in float32, which changes what eager
  attention saves (its probabilities). ``--autocast-policy cuda`` (the default) runs those
  three in float32 as CUDA does (:class:`CudaAutocastFloat32Ops`); ``cpu`` leaves CPU
  autocast as it is.

Limits (an estimate, not a GPU measurement):
- Memory held at the start of the backward only: not the forward's transient buffers, not
  what the backward allocates (activation gradients, parameter gradients building up,
  kernel scratch), not allocator caching or fragmentation, nor cuBLAS/cuDNN workspaces.
- CPU and CUDA autocast differ beyond the three ops emulated (CUDA also runs e.g. norms,
  exp and pow in float32); in these models that touches only small tensors.
- The activation total at batch 64 is extrapolated along the line through the census at
  the census batch and a second one at that batch + 1: exact for what grows linearly
  with the batch, stays fixed (a feature queue) or both; the ITC step's B x B similarity
  matrix is quadratic but tiny. The groups are listed at the census batch. Weight casts
  are fixed-size.
- The stand-ins' log-sum-exp of attention is zeros (only the backward reads it).

Usage::

    python bench/activation_census.py                          # BLIP-base, batch 2, bf16
    python bench/activation_census.py --steps captioning --batch 1
    python bench/activation_census.py --small                  # tiny config (smoke)
    python bench/activation_census.py --recompute-projections  # also that variant

The default full run (BLIP-base, every step, the default batch, scale, text length,
dtype and autocast policy; ``--recompute-projections`` and ``--top`` allowed) writes
``bench/results/activation_census.json``, the committed census, rewritten after every
implementation. Any other run (``--small``, a subset of ``--steps``, another ``--batch``,
...) prints its tables and writes a file only when ``--out`` names one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import gc
import importlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import blipfast
from blipfast import reference
from command_line import integer_at_least
from result_files import (
    INTERRUPTED_EXIT_STATUS, blipfast_revision, stop_on_interrupt, write_atomically)
from run_models import _config, _inputs, _loss, _models

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OUT = RESULTS / "activation_census.json"
"""The committed census: written by default by the default full run only."""
STEPS = ("captioning", "itm", "itc", "pretraining")
GIB = 2**30
MIB = 2**20


# --------------------------------------------------------------------------------------
# Triton stand-ins: blipfast's eager autograd path on the CPU, kernels replaced by PyTorch
# --------------------------------------------------------------------------------------


def _kernels_run_on_every_device(device: torch.device, *inputs: object, op: str = "") -> bool:
    """Replacement of ``blipfast.ops._dispatch.use_triton``: the ops take their Triton
    path (whose launchers are stood in for) on any device."""
    return True


@contextlib.contextmanager
def _plain_float32_computation() -> Iterator[None]:
    """No autograd recording and no CPU autocast: stand-ins compute as the kernels do, in
    float32, and save nothing."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        yield


def _attention_forward_stand_in(q, k, v, key_padding_mask, kv_index, causal, softmax_scale,
                                config=None):
    """``blipfast.kernels.attention.attention_forward`` in PyTorch: (out (B, Lq, H, D) in
    q's dtype, log_sum_exp (B, H, Lq) float32). The output is the reference attention's;
    the log-sum-exp, read only by the backward, is zeros."""
    with _plain_float32_computation():
        out = reference.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                  kv_index=kv_index, softmax_scale=softmax_scale)
        batch, len_q, num_heads, _ = q.shape
        log_sum_exp = torch.zeros((batch, num_heads, len_q), dtype=torch.float32,
                                  device=q.device)
        return out.contiguous(), log_sum_exp


def _layer_norm_forward_stand_in(x, residual, weight, bias, eps, store_sum, config=None):
    """``blipfast.kernels.layer_norm.layer_norm_forward`` in PyTorch: (y, s, mean, rstd),
    y and s in x's dtype shaped like x (s empty unless ``store_sum``), mean and rstd
    float32 over ``x.shape[:-1]``. As the kernel, it normalizes the float32 sum, or with
    ``store_sum`` the sum as stored in x's dtype."""
    with _plain_float32_computation():
        total = x.float() if residual is None else x.float() + residual.float()
        stored_sum = x.new_empty(0)
        if store_sum:
            stored_sum = total.to(x.dtype)
            total = stored_sum.float()
        variance, mean = torch.var_mean(total, dim=-1, correction=0)
        rstd = torch.rsqrt(variance + eps)
        normed = F.layer_norm(total, (x.shape[-1],),
                              weight.float() if weight is not None else None,
                              bias.float() if bias is not None else None, eps)
        return normed.to(x.dtype).contiguous(), stored_sum.contiguous(), mean, rstd


def _bias_gelu_forward_stand_in(x, bias, config=None):
    """``blipfast.kernels.bias_gelu.bias_gelu_forward`` in PyTorch: gelu(x + bias), exact,
    contiguous, in x's dtype (the reference)."""
    with _plain_float32_computation():
        return reference.bias_gelu(x, bias).contiguous()


def _cross_entropy_forward_stand_in(logits, labels, ignore_index, label_smoothing):
    """``blipfast.kernels.cross_entropy.cross_entropy_forward`` in PyTorch: (loss per row,
    0 where ignored; row statistics (2, *labels.shape): each row's largest logit and
    log(sum exp(logits - it))), float32."""
    with _plain_float32_computation():
        losses = reference.cross_entropy(logits, labels, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, reduction="none")
        maximum = logits.float().amax(-1)
        log_sum = (logits.float() - maximum[..., None]).exp().sum(-1).log()
        return losses.float(), torch.stack([maximum, log_sum])


def _score_statistics(scores, positives, teacher_scores, alpha, label_smoothing):
    """Per row of ``scores`` the rows of ``ROW_STATS`` in blipfast.kernels.contrastive: the
    largest score and log2 of the sum of exp(score - that), targets . scores, softmax .
    scores, positive count, and the teacher's two log-sum-exp parts (zeros without a
    teacher), with the kernel's soft targets."""
    count = positives.sum(1)
    targets = positives / count.clamp_min(1)[:, None]
    teacher_parts = [torch.zeros_like(count)] * 2
    if teacher_scores is not None:
        targets = alpha * torch.softmax(teacher_scores, 1) + (1 - alpha) * targets
        teacher_parts = _log_sum_exp_parts(teacher_scores)
    targets = (1 - label_smoothing) * targets + label_smoothing / scores.shape[1]
    return torch.stack([*_log_sum_exp_parts(scores), (targets * scores).sum(1),
                        (torch.softmax(scores, 1) * scores).sum(1), count, *teacher_parts])


def _log_sum_exp_parts(scores):
    score_max = scores.amax(1)
    return [score_max, torch.exp(scores - score_max[:, None]).sum(1).log2()]


def _gumbel_max_negatives(scores, positives, gumbel_noise, offset):
    """Per row of ``scores``, a column drawn from the softmax over its non-positives
    (Gumbel-max), as a global index (``offset`` + column); -1 where every column is a
    positive."""
    perturbed = (scores + gumbel_noise).masked_fill(positives > 0, float("-inf"))
    drawn = perturbed.argmax(1) + offset
    return torch.where((positives == 0).any(1), drawn, torch.full_like(drawn, -1))


def _contrastive_forward_stand_in(row_feat, column_feat, logit_scale, row_ids, column_ids, *,
                                  teacher_feat=None, seed=None, row_term=True,
                                  column_term=True, alpha=0.0, label_smoothing=0.0,
                                  row_index_offset=0, column_index_offset=0, config=None):
    """``blipfast.kernels.contrastive.contrastive_forward`` in PyTorch, on the materialized
    score matrix: (row_stats (7, R), column_stats (5, C), row_negatives (R,),
    column_negatives (C,)), statistics in float32, negatives as int64 global indices
    (Gumbel-max over the non-positives, noise seeded from ``seed``), empty for a term that
    is off and negatives empty without a seed."""
    with _plain_float32_computation():
        rows = row_feat if row_feat.dim() == 3 else row_feat.unsqueeze(1)
        scale = logit_scale.float().reshape(())
        scores = scale * torch.einsum("iqd,jd->ijq", rows.float(), column_feat.float()).amax(-1)
        positives = (row_ids[:, None] == column_ids[None, :]).float()
        gumbel_noise = None
        if seed is not None:
            generator = torch.Generator(device=scores.device).manual_seed(int(seed))
            uniform = torch.rand(scores.shape, generator=generator, device=scores.device)
            gumbel_noise = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        row_stats = scores.new_empty(7, 0)
        row_negatives = torch.empty(0, dtype=torch.int64, device=scores.device)
        if row_term:
            teacher_scores = None
            if teacher_feat is not None:
                teacher_scores = scale * teacher_feat.float() @ column_feat.float().t()
            row_stats = _score_statistics(scores, positives, teacher_scores, alpha,
                                          label_smoothing)
            if gumbel_noise is not None:
                row_negatives = _gumbel_max_negatives(scores, positives, gumbel_noise,
                                                      column_index_offset)
        column_stats = scores.new_empty(5, 0)
        column_negatives = torch.empty(0, dtype=torch.int64, device=scores.device)
        if column_term:
            column_stats = _score_statistics(scores.t(), positives.t(), None, 0.0,
                                             label_smoothing)[:5]
            if gumbel_noise is not None:
                column_negatives = _gumbel_max_negatives(scores.t(), positives.t(),
                                                         gumbel_noise.t(), row_index_offset)
        return row_stats.contiguous(), column_stats.contiguous(), row_negatives, column_negatives


# Forward launcher (module, name) -> its PyTorch stand-in.
LAUNCHER_STAND_INS = {
    ("blipfast.kernels.attention", "attention_forward"): _attention_forward_stand_in,
    ("blipfast.kernels.layer_norm", "layer_norm_forward"): _layer_norm_forward_stand_in,
    ("blipfast.kernels.bias_gelu", "bias_gelu_forward"): _bias_gelu_forward_stand_in,
    ("blipfast.kernels.cross_entropy", "cross_entropy_forward"): _cross_entropy_forward_stand_in,
    ("blipfast.kernels.contrastive", "contrastive_forward"): _contrastive_forward_stand_in,
}


def modules_holding_use_triton() -> list:
    """Every loaded ``blipfast.*`` module whose namespace holds the original
    ``blipfast.ops._dispatch.use_triton`` (the ops import the name itself; importing
    blipfast loads every ops module)."""
    from blipfast.ops import _dispatch

    return [module for name, module in list(sys.modules.items())
            if name.startswith("blipfast.") and module is not None
            and getattr(module, "use_triton", None) is _dispatch.use_triton]


@contextlib.contextmanager
def triton_stand_ins() -> Iterator[collections.Counter]:
    """Run blipfast's ops on their Triton path with PyTorch in place of the kernels.

    Inside: ``use_triton`` is true for every device in each module that holds it, and each
    forward launcher of ``LAUNCHER_STAND_INS`` is its stand-in, so in eager mode every op
    goes through its ``autograd.Function`` and saves what it saves on the GPU. Yields a
    Counter of stand-in calls by launcher name. On exit (also on an exception) every
    replaced name is restored to the original object.
    """
    calls = collections.Counter()
    replaced = []  # (namespace, name, original), in order of replacement

    def replace(namespace, name, replacement):
        replaced.append((namespace, name, getattr(namespace, name)))
        setattr(namespace, name, replacement)

    def counted(launcher_name, stand_in):
        @functools.wraps(stand_in)
        def call(*args, **kwargs):
            calls[launcher_name] += 1
            return stand_in(*args, **kwargs)
        return call

    try:
        for module in modules_holding_use_triton():
            replace(module, "use_triton", _kernels_run_on_every_device)
        for (module_name, launcher_name), stand_in in LAUNCHER_STAND_INS.items():
            replace(importlib.import_module(module_name), launcher_name,
                    counted(launcher_name, stand_in))
        # The census records with its own saved-tensor hooks; blipfast's recomputation in
        # the backward steps aside for other hooks unless told to pass them the rest.
        replace(importlib.import_module("blipfast.ops.recompute"), "CHAIN_TO_OUTER_HOOKS",
                True)
        yield calls
    finally:
        for namespace, name, original in reversed(replaced):
            setattr(namespace, name, original)


# --------------------------------------------------------------------------------------
# CUDA autocast's float32 ops, on the CPU
# --------------------------------------------------------------------------------------


class CudaAutocastFloat32Ops(TorchFunctionMode):
    """Under CPU autocast, run softmax, log_softmax and layer_norm in float32, as CUDA
    autocast does (CPU autocast runs them in the input's dtype). Their input is cast to
    float32 first; the cast saves nothing, so autograd saves what it saves on CUDA (e.g.
    eager attention's probabilities in float32)."""

    FUNCTIONS = frozenset({
        F.softmax, torch.softmax, torch.Tensor.softmax,
        F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
        F.layer_norm, torch.layer_norm,
    })
    LOWER_PRECISION = (torch.bfloat16, torch.float16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUNCTIONS and torch.is_autocast_enabled("cpu"):
            if args and isinstance(args[0], torch.Tensor) and args[0].dtype in self.LOWER_PRECISION:
                args = (args[0].float(), *args[1:])
            elif isinstance(kwargs.get("input"), torch.Tensor) \
                    and kwargs["input"].dtype in self.LOWER_PRECISION:
                kwargs = {**kwargs, "input": kwargs["input"].float()}
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------
# Recording saved tensors
# --------------------------------------------------------------------------------------


@dataclass
class SavedTensor:
    """One tensor autograd saved: the tensor, the module path running when it was saved,
    and the autograd node that holds it (set when the graph walk unpacks it; None for a
    tensor the backward would never read)."""

    tensor: Optional[torch.Tensor]  # None once the census is summarized
    module_path: str
    saved_by: Optional[str] = None


class SavedTensorRecorder:
    """While active (``with``), records every tensor autograd saves, with the innermost
    module of ``model`` running at the time; :meth:`walk_graph` then tells which of them
    the backward of a loss would read."""

    def __init__(self, model: nn.Module):
        self._module_paths = {module: path for path, module in model.named_modules()}
        self._running_modules: list[str] = []
        self._unpacking_node: Optional[str] = None
        self._exit_stack: Optional[contextlib.ExitStack] = None
        self.records: list[SavedTensor] = []

    def __enter__(self) -> "SavedTensorRecorder":
        module_hooks = torch.nn.modules.module
        with contextlib.ExitStack() as stack:
            stack.enter_context(module_hooks.register_module_forward_pre_hook(self._module_starts))
            stack.enter_context(module_hooks.register_module_forward_hook(self._module_ends,
                                                                          always_call=True))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack,
                                                                         self._unpack))
            self._exit_stack = stack.pop_all()
        return self

    def __exit__(self, *exception) -> None:
        self._exit_stack.close()
        self._running_modules.clear()

    def _module_starts(self, module, args) -> None:
        path = self._module_paths.get(module)
        if path is not None:
            self._running_modules.append(path)

    def _module_ends(self, module, args, output) -> None:
        if module in self._module_paths:
            self._running_modules.pop()

    def _pack(self, tensor: torch.Tensor) -> SavedTensor:
        path = self._running_modules[-1] if self._running_modules else ""
        record = SavedTensor(tensor, path)
        self.records.append(record)
        return record

    def _unpack(self, record: SavedTensor) -> torch.Tensor:
        if self._unpacking_node is not None and record.saved_by is None:
            record.saved_by = self._unpacking_node
        return record.tensor

    def walk_graph(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Visit every autograd node the backward of ``loss`` would run and unpack its saved
        tensors, which names their records' ``saved_by``. Returns the leaf tensors that
        would receive a gradient (the trained parameters)."""
        leaves = []
        pending, visited = [loss.grad_fn], set()
        while pending:
            node = pending.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            if type(node).__name__ == "AccumulateGrad":
                leaves.append(node.variable)
            self._unpacking_node = type(node).__name__
            try:
                _read_saved_tensors(node)
            finally:
                self._unpacking_node = None
            pending.extend(next_node for next_node, _ in node.next_functions)
        return leaves


def _read_saved_tensors(node) -> None:
    """Read every tensor a node saved (calling the unpack hooks): ``saved_tensors`` of a
    custom ``autograd.Function``, the ``_saved_*`` attributes of a built-in node."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        node.saved_tensors
        return
    for name in dir(node):
        if name.startswith("_saved_"):
            getattr(node, name)


# --------------------------------------------------------------------------------------
# Classifying and summing
# --------------------------------------------------------------------------------------


# Autograd nodes of casts and views: a saved tensor reached from a parameter through these
# only (and at least one cast) is an autocast copy of the weight.
CAST_AND_VIEW_NODES = frozenset({
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ExpandBackward0", "UnsqueezeBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SliceBackward0", "SelectBackward0",
    "AliasBackward0",
})


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identifies the buffer under a tensor: views of one buffer share it."""
    return tensor.device.type, tensor.untyped_storage().data_ptr()


def _is_parameter_cast(tensor: torch.Tensor, parameter_storages: set) -> bool:
    """Whether ``tensor`` is a parameter (of ``parameter_storages``) through casts and views
    only, at least one of them a cast: an autocast copy of a weight."""
    node, cast = tensor.grad_fn, False
    while node is not None and type(node).__name__ in CAST_AND_VIEW_NODES:
        cast = cast or type(node).__name__ == "ToCopyBackward0"
        node = next((next_node for next_node, _ in node.next_functions if next_node is not None),
                    None)
    return (cast and type(node).__name__ == "AccumulateGrad"
            and _storage_key(node.variable) in parameter_storages)


def normalized_module_path(path: str) -> str:
    """``vision_model.encoder.layers.3.self_attn`` -> ``vision_model.encoder.layers.*.self_attn``;
    the model itself (the empty path) is ``(model)``."""
    if not path:
        return "(model)"
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _shape_text(tensor: torch.Tensor, storage_bytes: int) -> str:
    """``2x577x768``; a view of a larger storage says how much larger (the bytes counted
    are the storage's)."""
    text = "x".join(str(size) for size in tensor.shape) or "scalar"
    view_bytes = tensor.numel() * tensor.element_size()
    if storage_bytes > view_bytes:
        text += f" (view of {storage_bytes / max(view_bytes, 1):.3g}x storage)"
    return text


@dataclass
class Group:
    """Saved storages of one kind ("activation" or "weight cast") with the same module
    path (normalized), saving node, shape and dtype."""

    kind: str
    module: str
    saved_by: str
    shape: str
    dtype: str
    count: int = 0
    bytes: int = 0


@dataclass
class Census:
    """What one forward + loss keeps for its backward, at the census batch, and the
    parameter state of training the model with AdamW."""

    activation_bytes: int
    weight_cast_bytes: int
    parameter_count: int
    trained_parameter_count: int  # parameters the loss reaches: they get gradients
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    groups: list[Group]
    stand_in_calls: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # activation bytes at batch + 1 minus those at the census batch (set by main)
    activation_bytes_per_sample: float = 0.0


def summarize(recorder: SavedTensorRecorder, model: nn.Module, loss: torch.Tensor) -> Census:
    """Count the storages the backward of ``loss`` would read, once each, by group.
    Parameters and buffers are left out; weight casts are told from activations."""
    trained = recorder.walk_graph(loss)
    parameter_storages = {_storage_key(tensor)
                          for tensor in [*model.parameters(), *model.buffers()]}
    groups: dict[tuple, Group] = {}
    counted = set()
    for record in recorder.records:
        if record.saved_by is None:
            continue  # in a part of the graph the backward does not reach
        key = _storage_key(record.tensor)
        storage_bytes = record.tensor.untyped_storage().nbytes()
        if storage_bytes == 0 or key in parameter_storages or key in counted:
            continue
        counted.add(key)
        kind = ("weight cast" if _is_parameter_cast(record.tensor, parameter_storages)
                else "activation")
        group_key = (kind, normalized_module_path(record.module_path), record.saved_by,
                     _shape_text(record.tensor, storage_bytes),
                     str(record.tensor.dtype).removeprefix("torch."))
        group = groups.setdefault(group_key, Group(*group_key))
        group.count += 1
        group.bytes += storage_bytes
    ordered = sorted(groups.values(), key=lambda group: -group.bytes)
    trained_parameters = {id(tensor): tensor for tensor in trained}.values()
    trained_bytes = sum(tensor.nbytes for tensor in trained_parameters)
    return Census(
        activation_bytes=sum(group.bytes for group in ordered if group.kind == "activation"),
        weight_cast_bytes=sum(group.bytes for group in ordered if group.kind == "weight cast"),
        parameter_count=sum(parameter.numel() for parameter in model.parameters()),
        trained_parameter_count=sum(tensor.numel() for tensor in trained_parameters),
        parameter_bytes=sum(parameter.nbytes for parameter in model.parameters()),
        gradient_bytes=trained_bytes,
        optimizer_bytes=2 * trained_bytes,  # AdamW's exp_avg and exp_avg_sq, as the params
        groups=ordered)


def take_census(step: str, model: nn.Module, inputs: dict, autocast_dtype: torch.dtype,
                autocast_policy: str) -> Census:
    """Forward + loss of ``step`` on ``model`` in training mode, recorded and summarized.
    ``autocast_dtype`` float32 runs without autocast."""
    model.train()
    use_autocast = autocast_dtype != torch.float32
    with contextlib.ExitStack() as stack:
        recorder = stack.enter_context(SavedTensorRecorder(model))
        stack.enter_context(torch.autocast("cpu", dtype=autocast_dtype, enabled=use_autocast))
        if use_autocast and autocast_policy == "cuda":
            stack.enter_context(CudaAutocastFloat32Ops())
        loss = _loss(step, model, inputs)
    census = summarize(recorder, model, loss)
    # A record holding a tensor whose autograd node holds the record is a reference cycle
    # through C++ that Python's collector cannot see: drop the tensors so the graph goes.
    for record in recorder.records:
        record.tensor = None
    return census


def uses_blipfast(model: nn.Module) -> bool:
    """blipfast's own model, or a transformers model patched by ``blipfast.patch``."""
    return type(model).__module__.startswith("blipfast.") or blipfast.is_patched(model)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def scaled_activation_bytes(census: Census, batch: int, target_batch: int) -> float:
    """Activation bytes at ``target_batch``, extrapolated along the line through the
    census at ``batch`` and the one at ``batch + 1`` (``census.activation_bytes_per_sample``
    is their difference): exact for activations that grow linearly with the batch, stay
    fixed (a feature queue) or both (momentum features concatenated with the queue)."""
    return census.activation_bytes + census.activation_bytes_per_sample * (target_batch - batch)


def estimated_total_bytes(census: Census, batch: int, target_batch: int) -> float:
    """Held when the backward starts at ``target_batch``: activations, weight casts,
    parameters, gradients and AdamW states."""
    return (scaled_activation_bytes(census, batch, target_batch) + census.weight_cast_bytes
            + census.parameter_bytes + census.gradient_bytes + census.optimizer_bytes)


def step_table(step: str, censuses: dict[str, Census], batch: int, target_batch: int,
               top: int) -> str:
    """Markdown: one row per implementation, then each one's top activation groups."""
    lines = [f"### {step}\n",
             "| implementation | activations GiB | weight casts GiB | params+grads+AdamW GiB "
             "| estimated total GiB | stand-in calls | census s |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name, census in censuses.items():
        state = census.parameter_bytes + census.gradient_bytes + census.optimizer_bytes
        calls = ", ".join(f"{launcher} {count}"
                          for launcher, count in sorted(census.stand_in_calls.items())) or "-"
        lines.append(f"| {name} | {scaled_activation_bytes(census, batch, target_batch) / GIB:.2f} "
                     f"| {census.weight_cast_bytes / GIB:.2f} | {state / GIB:.2f} "
                     f"| {estimated_total_bytes(census, batch, target_batch) / GIB:.2f} "
                     f"| {calls} | {census.seconds:.1f} |")
    lines += ["", "Estimated total = activations (scaled) + weight casts (not scaled) + "
                  "params+grads+AdamW: fp32 parameters, plus a gradient and AdamW's two "
                  "moments in fp32 for each parameter the loss reaches (16 bytes per trained "
                  "parameter): " + "; ".join(
                      f"{name} {census.parameter_count / 1e6:.4g} M parameters, "
                      f"{census.trained_parameter_count / 1e6:.4g} M trained"
                      for name, census in censuses.items()) + "."]
    for name, census in censuses.items():
        activations = [group for group in census.groups if group.kind == "activation"]
        lines += ["", f"{name}: top {min(top, len(activations))} of {len(activations)} "
                      f"activation groups (MiB and shapes at the census batch, {batch})",
                  "", "| module | saved by | shape | dtype | count | MiB | share |",
                  "|---|---|---|---|---:|---:|---:|"]
        for group in activations[:top]:
            lines.append(f"| {group.module} | {group.saved_by} | {group.shape} | {group.dtype} "
                         f"| {group.count} | {group.bytes / MIB:.1f} "
                         f"| {100 * group.bytes / max(census.activation_bytes, 1):.1f}% |")
    return "\n".join(lines)


def _json_entry(census: Census, batch: int, target_batch: int) -> dict:
    """The census as JSON data, with the scaled and estimated totals and every group's
    bytes at ``target_batch`` (weight casts unscaled)."""
    entry = asdict(census)
    entry["activation_bytes_scaled"] = scaled_activation_bytes(census, batch, target_batch)
    entry["estimated_total_bytes"] = estimated_total_bytes(census, batch, target_batch)
    return entry


SCOPE_OPTIONS = ("steps", "batch", "scale_to", "length", "dtype", "autocast_policy", "small")
"""The options that change what the census measures: with each at its default, a run is
the default full run, whose results are the committed ``DEFAULT_OUT``."""


def is_default_full_run(parser: argparse.ArgumentParser, options: argparse.Namespace) -> bool:
    """Whether every option of :data:`SCOPE_OPTIONS` has its default (the steps in any
    order)."""
    for name in SCOPE_OPTIONS:
        value, default = getattr(options, name), parser.get_default(name)
        if name == "steps":
            value, default = sorted(value), sorted(default)
        if value != default:
            return False
    return True


def parse_arguments(arguments=None) -> argparse.Namespace:
    """Parse the command line; ``out`` is :data:`DEFAULT_OUT` for the default full run
    without ``--out``, None for any other run without it."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"Only the default full run writes {DEFAULT_OUT.name} by default; other runs "
               "(--small, a subset of --steps, another --batch, ...) print their tables and "
               "write a file only with --out.")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--batch", type=integer_at_least(1), default=2, help="batch of the census (CPU)")
    parser.add_argument("--scale-to", type=integer_at_least(1), default=64,
                        help="batch the activation bytes are scaled to (the GPU benchmark's)")
    parser.add_argument("--length", type=integer_at_least(2), default=35, help="text length")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="autocast dtype; float32 runs without autocast")
    parser.add_argument("--autocast-policy", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: softmax, log_softmax and layer_norm in float32 as CUDA "
                             "autocast runs them; cpu: CPU autocast as it is")
    parser.add_argument("--recompute-projections", action="store_true",
                        help="also blipfast's model with the ViT's QKV and fc1 outputs "
                             "recomputed in the backward")
    parser.add_argument("--small", action="store_true",
                        help="the tiny config of run_models --cpu-smoke")
    parser.add_argument("--top", type=integer_at_least(1), default=12, help="activation groups listed")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: bench/results/activation_census.json "
                             "for the default full run only; any other run writes no file "
                             "unless given). Entries of a file with the same settings that "
                             "this run does not measure are kept")
    options = parser.parse_args(arguments)
    if options.out is None and is_default_full_run(parser, options):
        options.out = DEFAULT_OUT
    if options.out is not None and options.out.is_dir():
        parser.error(f"argument --out: {options.out} is a directory (give a file name)")
    return options


SETTINGS = ("batch", "scaled_to_batch", "length", "dtype", "autocast_policy", "small")
"""The fields of a results file that say what its census measured: entries of an existing
file with the same values are kept beside this run's."""


def _earlier_entries(path: Optional[Path], results: dict) -> dict:
    """The census entries ({step: {implementation: entry}}) of the results file at
    ``path`` when it was taken with ``results``' settings; none otherwise (a file of other
    settings is replaced, with a line saying so)."""
    if path is None or not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
        same = all(earlier.get(name) == results[name] for name in SETTINGS)
        steps = earlier["steps"] if same else {}
    except (ValueError, KeyError, TypeError, AttributeError):
        same, steps = False, {}
    if not same:
        print(f"{path} holds a census of other settings (or is unreadable): this run's "
              "results replace it", flush=True)
        return {}
    # entries of runs that did not record their versions: the header of their file says
    label = f"the run whose header was: {earlier.get('header', 'unknown')}"
    return {step: {name: entry if "measured_with" in entry else {**entry, "measured_with": label}
                   for name, entry in entries.items()}
            for step, entries in steps.items()}


def main(arguments=None) -> int:
    """Take the census of the selected steps, print the tables and write the JSON file
    (:func:`parse_arguments` says which, if any)."""
    options = parse_arguments(arguments)
    import transformers

    transformers.logging.set_verbosity_error()
    config = _config(options.small)
    autocast_dtype = getattr(torch, options.dtype)
    batch, target_batch = options.batch, options.scale_to
    if autocast_dtype == torch.float32:
        precision = "float32, no autocast"
    elif options.autocast_policy == "cuda":
        precision = (f"{options.dtype} autocast with softmax, log_softmax and layer_norm in "
                     "float32 as on CUDA")
    else:
        precision = f"{options.dtype} autocast as on the CPU"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    today = datetime.date.today().isoformat()
    header = (f"Activation census, BLIP-{'small' if options.small else 'base'}: forward + loss "
              f"on the CPU at batch {batch}, text length {options.length}, {precision}; "
              f"activations scaled to batch {target_batch}. {versions}, {today}.")
    print(header, flush=True)
    measured = f"{versions}, {blipfast_revision()}, {today}"
    results = dict(header=header, batch=batch, scaled_to_batch=target_batch,
                   length=options.length, dtype=options.dtype,
                   autocast_policy=options.autocast_policy, small=options.small, steps={})
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        results["steps"] = _earlier_entries(options.out, results)
    else:
        print("not the default full run: nothing is written (--out FILE to keep the results)",
              flush=True)
    with stop_on_interrupt("the census") as interruption:
        _take_censuses(options, config, autocast_dtype, results, measured)
    if options.out is not None:
        print(f"wrote {options.out}" + (" (the entries measured before the interruption "
                                        "beside the file's earlier ones)"
                                        if interruption.interrupted else ""))
    return INTERRUPTED_EXIT_STATUS if interruption.interrupted else 0


def _take_censuses(options: argparse.Namespace, config, autocast_dtype: torch.dtype,
                   results: dict, measured: str) -> None:
    """The census of every selected step and implementation, each entry written to
    ``options.out`` (when given) as soon as it is taken, with ``measured`` (versions and
    date) in it; prints each step's table."""
    batch, target_batch = options.batch, options.scale_to
    for step in options.steps:
        inputs = _inputs(step, config, batch, options.length, "cpu")
        inputs_at_other_batch = _inputs(step, config, batch + 1, options.length, "cpu")
        variants = _models(step, config, "cpu", compile_peer=False,
                           recompute_projections=options.recompute_projections)
        censuses: dict[str, Census] = {}
        for name in list(variants):
            model = variants.pop(name)
            started = time.perf_counter()
            with (triton_stand_ins() if uses_blipfast(model) else
                  contextlib.nullcontext(collections.Counter())) as calls:
                census = take_census(step, model, inputs, autocast_dtype,
                                     options.autocast_policy)
                census.stand_in_calls = dict(calls)
                gc.collect()  # whatever of the first forward is left in reference cycles
                census_at_other_batch = take_census(step, model, inputs_at_other_batch,
                                                    autocast_dtype, options.autocast_policy)
                census.activation_bytes_per_sample = (census_at_other_batch.activation_bytes
                                                      - census.activation_bytes)
            census.seconds = time.perf_counter() - started
            censuses[name] = census
            entry = _json_entry(census, batch, target_batch)
            entry["measured_with"] = measured
            results["steps"].setdefault(step, {})[name] = entry
            if options.out is not None:
                write_atomically(options.out, json.dumps(results, indent=1) + "\n")
            print(f"{step} / {name}: {census.seconds:.1f} s", flush=True)
            del model
            gc.collect()  # anything of the model left in reference cycles
        print("\n" + step_table(step, censuses, batch, target_batch, options.top) + "\n",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
