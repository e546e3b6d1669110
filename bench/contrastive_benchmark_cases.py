"""Shared definitions for the contrastive (ITC) loss benchmarks.

Both ``bench/test_contrastive_speed.py`` (pytest-benchmark) and
``bench/run_contrastive.py`` (standalone script) import this module, so the cases, the
input construction, the implementations under comparison, the correctness check, the
timing, the memory measurement and the result formatting live in exactly one place.

The loss is BLIP's image-text contrastive loss over a batch of ``N`` pairs::

    logits = logit_scale * image_feat @ text_feat.T                       # (N, N)
    loss = 0.5 * (CE(logits, arange(N)) + CE(logits.T, arange(N)))

and its BLIP-2 (Q-Former) form, where ``image_feat`` is ``(N, Q, D)`` and
``logits[i, j] = logit_scale * max_q image_feat[i, q] . text_feat[j]``.

Three implementations are measured, each for forward plus backward (the loss and its
gradients with respect to ``image_feat``, ``text_feat`` and ``logit_scale``):

* ``blipfast``: ``blipfast.ops.contrastive_loss``, which never builds the ``N x N`` logits.
* ``materialized``: the loss as users write it in PyTorch, with the full logits in the
  feature dtype (see :func:`materialized_contrastive_loss`).
* ``matmuls_only``: the floor, the three matrix products the materialized loss needs
  (``S = I @ T.T``, ``dI = dS @ T``, ``dT = dS.T @ I``) into preallocated buffers.

Heavy or optional dependencies (``triton``, ``blipfast``) are imported lazily inside the
functions that need them, so this module can be imported on a machine without a GPU or
without those packages. On such a machine the same code runs on CPU tensors (see
``run_contrastive.py --cpu-smoke``): the timer falls back to ``time.perf_counter`` and no
memory is measured.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

# Device and version reporting and the do_bench timing are shared with the attention
# benchmark; collect_environment is re-exported for bench/conftest.py and run_contrastive.py.
from attention_benchmark_cases import (  # noqa: F401
    TIMING_REPETITION_MILLISECONDS,
    TIMING_WARMUP_MILLISECONDS,
    collect_environment,
    device_slug,
    environment_header,
)
from attention_benchmark_cases import time_milliseconds as do_bench_milliseconds
from result_files import UNKNOWN_ENVIRONMENT, ResultFile, dataclass_from_row, write_day_results

Status = Literal["ok", "oom", "unavailable", "error", "incorrect"]
"""``oom``: out of device memory; ``unavailable``: blipfast's op cannot be imported;
``error``: the implementation raised; ``incorrect``: it ran but failed the check."""

DTYPE = torch.bfloat16
FEATURE_DIM = 256
DEFAULT_SEED = 0
TEMPERATURE = 0.07
"""``logit_scale`` is initialised to ``1 / TEMPERATURE``, BLIP's initial temperature."""

FALLBACK_TIMED_CALLS = (3, 100)
"""Fewest and most calls of the event/perf_counter fallback timer."""

CHECK_BATCH_SIZE = 2048
"""The correctness check runs at ``N = min(case N, CHECK_BATCH_SIZE)``, same Q and D."""

RELATIVE_TOLERANCES: dict[torch.dtype, float] = {
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
    torch.float32: 1e-3,
}
"""Largest allowed ``max |result - reference| / max |reference|`` for the loss and each
gradient, by input dtype; the reference is the fp32 materialized loss."""

FLOOR_GRADIENT_SEED = 1
"""Seed of the random ``dS`` that the matmuls-only floor multiplies."""

BASELINE_IMPLEMENTATION = "blipfast"
REFERENCE_IMPLEMENTATION = "materialized"
FLOOR_IMPLEMENTATION = "matmuls_only"
IMPLEMENTATION_NAMES: tuple[str, ...] = (
    BASELINE_IMPLEMENTATION,
    REFERENCE_IMPLEMENTATION,
    FLOOR_IMPLEMENTATION,
)
CHECKED_IMPLEMENTATIONS: tuple[str, ...] = (BASELINE_IMPLEMENTATION,)
"""Implementations verified against the fp32 reference before they are timed."""

MEBIBYTE = 1 << 20

# Targets from the issue, summarised under the results table.
TARGET_CASE = "itc_n32768"
TARGET_SPEEDUP = 10.0
"""At ``TARGET_CASE``, blipfast at least this many times faster than the materialized loss."""
TARGET_FLOOR_RATIO = 2.5
"""At ``TARGET_CASE``, blipfast at most this many times the matmuls-only time."""
TARGET_MEMORY_FRACTION = 0.02
"""blipfast's extra memory below this fraction of the materialized loss's."""
LARGEST_CASE = "itc_n131072"
"""blipfast must complete this case on one GPU."""


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ContrastiveCase:
    """One benchmark size: ``N`` image-text pairs, ``Q`` query embeddings per image."""

    name: str
    batch_size: int
    queries: int = 1
    dim: int = FEATURE_DIM

    @property
    def shape_description(self) -> str:
        """Compact shape text, e.g. ``N=4096 Q=32 D=256``."""
        return f"N={self.batch_size} Q={self.queries} D={self.dim}"

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(N, D)``, or ``(N, Q, D)`` for the multi-query form."""
        if self.queries == 1:
            return (self.batch_size, self.dim)
        return (self.batch_size, self.queries, self.dim)

    def floating_point_operations(self) -> int:
        """FLOPs of the three matrix products of forward plus backward: ``6 * N * Q * N * D``.

        Each product (``S = I @ T.T``, ``dI = dS @ T``, ``dT = dS.T @ I``, with ``I`` the
        ``(N * Q, D)`` query matrix) is ``2 * N * Q * N * D``. Every implementation is
        credited with this nominal work.
        """
        return 6 * self.batch_size * self.queries * self.batch_size * self.dim

    def with_batch_size(self, batch_size: int) -> ContrastiveCase:
        """The same case at another ``N`` (used for the correctness check)."""
        if batch_size == self.batch_size:
            return self
        return dataclasses.replace(self, name=f"{self.name}@N={batch_size}", batch_size=batch_size)


CASES: tuple[ContrastiveCase, ...] = (
    ContrastiveCase("itc_n4096", 4096),
    ContrastiveCase("itc_n16384", 16384),
    ContrastiveCase("itc_n32768", 32768),
    ContrastiveCase("itc_n65536", 65536),
    ContrastiveCase("itc_n131072", 131072),
    ContrastiveCase("itc_q32_n4096", 4096, queries=32),
    ContrastiveCase("itc_q32_n16384", 16384, queries=32),
)
CASES_BY_NAME: dict[str, ContrastiveCase] = {case.name: case for case in CASES}


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how a case runs: the GPU benchmark defaults, or CPU float32 for smoke runs."""

    device: str = "cuda"
    dtype: torch.dtype = DTYPE
    seed: int = DEFAULT_SEED
    verify: bool = True
    """Check the implementations in ``CHECKED_IMPLEMENTATIONS`` before timing them."""

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a :class:`torch.device`."""
        return torch.device(self.device)


@dataclasses.dataclass
class ContrastiveInputs:
    """Leaf tensors of one call; all three require gradients."""

    image_feat: torch.Tensor
    """``(N, D)`` or ``(N, Q, D)``, L2-normalised along D."""
    text_feat: torch.Tensor
    """``(N, D)``, L2-normalised along D."""
    logit_scale: torch.Tensor
    """0-dim float32 tensor, ``1 / TEMPERATURE``."""

    def differentiable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_feat, text_feat, logit_scale)``, the tensors the gradients are taken of."""
        return (self.image_feat, self.text_feat, self.logit_scale)

    def upcast(self) -> ContrastiveInputs:
        """Detached float32 copies that require gradients (for the reference)."""
        return ContrastiveInputs(
            *(tensor.detach().float().requires_grad_(True) for tensor in self.differentiable())
        )


def make_inputs(case: ContrastiveCase, settings: RunSettings = RunSettings()) -> ContrastiveInputs:
    """Reproducible random unit-norm features for ``case``.

    The features are drawn in float32 from a generator seeded with ``settings.seed``,
    normalised along the last dimension and cast to ``settings.dtype``, so every
    implementation measured for a case (and the correctness check, at its smaller N)
    sees identical data.
    """
    device = settings.torch_device
    generator = torch.Generator(device=device).manual_seed(settings.seed)

    def unit_features(shape: tuple[int, ...]) -> torch.Tensor:
        features = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return F.normalize(features, dim=-1).to(settings.dtype).requires_grad_(True)

    image_feat = unit_features(case.image_shape)
    text_feat = unit_features((case.batch_size, case.dim))
    logit_scale = torch.tensor(
        1.0 / TEMPERATURE, device=device, dtype=torch.float32, requires_grad=True
    )
    return ContrastiveInputs(image_feat, text_feat, logit_scale)


# --------------------------------------------------------------------------- #
# Implementations
# --------------------------------------------------------------------------- #


class ImplementationUnavailableError(Exception):
    """The implementation cannot be imported (e.g. blipfast's op is not written yet)."""


class IncorrectResultError(AssertionError):
    """The implementation ran but its result does not match the reference."""


Step = Callable[[], tuple[torch.Tensor, ...]]
"""One timed call: forward plus backward, returning the loss (or the logits) and gradients."""
LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(image_feat, text_feat, logit_scale) -> scalar loss``."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A contrastive loss implementation (or the matmuls-only floor) under comparison."""

    name: str
    build: Callable[[ContrastiveCase, ContrastiveInputs], Step]
    """Prepare everything that should not be timed and return the timed call."""


def materialized_contrastive_loss(
    image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """The contrastive loss as users write it: full ``N x N`` logits in the feature dtype.

    Multi-query (``image_feat`` of shape ``(N, Q, D)``): one ``(N, Q, N)`` similarity
    product, reduced with ``max`` over the queries, as LAVIS's BLIP-2 does. LAVIS itself
    broadcasts a batched product into ``(N, N, Q)`` once per direction; the single
    matrix product used here gives the same logits and is the faster baseline.
    """
    if image_feat.dim() == 3:
        similarity = torch.matmul(image_feat, text_feat.t()).max(dim=1).values
    else:
        similarity = image_feat @ text_feat.t()
    logits = logit_scale * similarity
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def loss_step_builder(
    loss_function: LossFunction,
) -> Callable[[ContrastiveCase, ContrastiveInputs], Step]:
    """A ``build`` for :class:`Implementation` that runs ``loss_function`` forward and backward.

    The step returns ``(loss, image_grad, text_grad, logit_scale_grad)``; gradients come
    from ``torch.autograd.grad``, so nothing accumulates into ``.grad`` between calls.
    """

    def build(case: ContrastiveCase, inputs: ContrastiveInputs) -> Step:
        differentiable = inputs.differentiable()

        def step() -> tuple[torch.Tensor, ...]:
            loss = loss_function(*differentiable)
            return (loss.detach(), *torch.autograd.grad(loss, differentiable))

        return step

    return build


def _build_blipfast_step(case: ContrastiveCase, inputs: ContrastiveInputs) -> Step:
    try:
        from blipfast.ops import contrastive_loss
    except Exception as error:  # not written yet, or the package fails to import
        raise ImplementationUnavailableError(
            f"blipfast.ops.contrastive_loss is not importable: {type(error).__name__}: "
            f"{_first_line(str(error))}"
        ) from error
    return loss_step_builder(contrastive_loss)(case, inputs)


def _build_matmuls_only_step(case: ContrastiveCase, inputs: ContrastiveInputs) -> Step:
    """The three products of the materialized loss into preallocated buffers.

    ``I`` is the ``(N * Q, D)`` query matrix (``(N, D)`` when Q = 1). ``dS`` is random,
    its values do not matter for the time.
    """
    image = inputs.image_feat.detach().reshape(-1, case.dim)
    text = inputs.text_feat.detach()
    generator = torch.Generator(device=image.device).manual_seed(FLOOR_GRADIENT_SEED)
    similarity_gradient = torch.randn(
        (image.shape[0], text.shape[0]), generator=generator, device=image.device, dtype=image.dtype
    )
    similarity = torch.empty_like(similarity_gradient)
    image_gradient = torch.empty_like(image)
    text_gradient = torch.empty_like(text)

    def step() -> tuple[torch.Tensor, ...]:
        torch.mm(image, text.t(), out=similarity)
        torch.mm(similarity_gradient, text, out=image_gradient)
        torch.mm(similarity_gradient.t(), image, out=text_gradient)
        return (similarity, image_gradient, text_gradient)

    return step


IMPLEMENTATIONS: dict[str, Implementation] = {
    BASELINE_IMPLEMENTATION: Implementation(BASELINE_IMPLEMENTATION, _build_blipfast_step),
    REFERENCE_IMPLEMENTATION: Implementation(
        REFERENCE_IMPLEMENTATION, loss_step_builder(materialized_contrastive_loss)
    ),
    FLOOR_IMPLEMENTATION: Implementation(FLOOR_IMPLEMENTATION, _build_matmuls_only_step),
}
assert tuple(IMPLEMENTATIONS) == IMPLEMENTATION_NAMES


# --------------------------------------------------------------------------- #
# Correctness check
# --------------------------------------------------------------------------- #


def check_correctness(
    implementation: Implementation, case: ContrastiveCase, settings: RunSettings = RunSettings()
) -> None:
    """Raise :class:`IncorrectResultError` unless ``implementation`` matches the reference.

    Runs at ``N = min(case N, CHECK_BATCH_SIZE)`` on ``dtype`` inputs; the reference is
    :func:`materialized_contrastive_loss` on the same values upcast to float32. The loss
    and the three gradients must each satisfy ``max |result - reference| / max
    |reference| < RELATIVE_TOLERANCES[dtype]``.

    Multi-query: each pair (i, j) sends its gradient to the best of the Q queries, so
    when two queries of a matching pair (i, i) are nearly tied, a difference in the last
    fp32 bits moves a large gradient entry to the other query and fails the check. On
    random unit features at N=2048, Q=32 the closest such gap is about 1e-6 (CPU
    generator, seeds 0-2), above the fp32 accumulation error of a D=256 product of bf16
    features; the bf16 materialized loss, which rounds the similarities to bf16 before
    the max, does not pass this check.
    """
    dtype = settings.dtype
    check_case = case.with_batch_size(min(case.batch_size, CHECK_BATCH_SIZE))
    inputs = make_inputs(check_case, settings)
    actual_tensors = implementation.build(check_case, inputs)()
    expected_tensors = loss_step_builder(materialized_contrastive_loss)(
        check_case, inputs.upcast()
    )()
    allowed = RELATIVE_TOLERANCES[dtype]
    names = ("loss", "image_feat grad", "text_feat grad", "logit_scale grad")
    problems = []
    if len(actual_tensors) != len(expected_tensors):
        problems.append(f"{len(actual_tensors)} results, expected {len(expected_tensors)}")
    for name, actual, expected in zip(names, actual_tensors, expected_tensors):
        if actual.shape != expected.shape:
            problems.append(f"{name} shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            continue
        error = (actual.detach().float() - expected).abs().max().item()
        scale = max(expected.abs().max().item(), 1e-12)
        if not error / scale < allowed:  # also catches NaN
            problems.append(
                f"{name}: max abs error {error:.3e} / max abs reference {scale:.3e} = "
                f"{error / scale:.3e} (limit {allowed:.0e})"
            )
    if problems:
        raise IncorrectResultError(
            f"{implementation.name} on {check_case.name} ({_dtype_name(dtype)}) does not "
            "match the fp32 materialized loss: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class MeasurementRecord:
    """One result row: an implementation measured on one case."""

    case: str
    implementation: str
    status: Status
    batch_size: int
    queries: int
    dim: int
    dtype: str
    milliseconds: float | None = None
    """Median time of forward plus backward."""
    peak_extra_bytes: int | None = None
    """Peak device memory of one call above the memory held by the inputs (None on CPU)."""
    timer: str | None = None
    """``do_bench``, ``cuda_events`` or ``perf_counter``."""
    reason: str | None = None
    """Why the implementation is not ``ok``."""

    @classmethod
    def create(
        cls,
        implementation_name: str,
        case: ContrastiveCase,
        status: Status,
        *,
        dtype: torch.dtype = DTYPE,
        **details: Any,
    ) -> MeasurementRecord:
        """A record of ``case``; ``details`` sets milliseconds, peak_extra_bytes, timer, reason."""
        shape = (case.batch_size, case.queries, case.dim)
        return cls(case.name, implementation_name, status, *shape, _dtype_name(dtype), **details)

    @property
    def floating_point_operations(self) -> int:
        """The nominal matrix-product work (:meth:`ContrastiveCase.floating_point_operations`)."""
        case = ContrastiveCase(self.case, self.batch_size, self.queries, self.dim)
        return case.floating_point_operations()

    @property
    def teraflops_per_second(self) -> float | None:
        """``floating_point_operations`` per second of the measured time, in TFLOP/s."""
        if not self.milliseconds:
            return None
        return self.floating_point_operations / (self.milliseconds * 1e-3) / 1e12

    @property
    def peak_extra_mebibytes(self) -> float | None:
        """``peak_extra_bytes`` in MiB."""
        return None if self.peak_extra_bytes is None else self.peak_extra_bytes / MEBIBYTE

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary of all fields and of the derived FLOPs and TFLOP/s."""
        return {
            **dataclasses.asdict(self),
            "floating_point_operations": self.floating_point_operations,
            "teraflops_per_second": self.teraflops_per_second,
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    """The timer :func:`time_milliseconds` uses on ``device``."""
    if device.type != "cuda":
        return "perf_counter"
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        return "cuda_events"
    return "do_bench"


def _elapsed_milliseconds(function: Callable[[], Any], device: torch.device) -> float:
    """Time of one call, with CUDA events on a GPU and ``perf_counter`` on CPU."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    function()
    return (time.perf_counter() - begin) * 1e3


def time_milliseconds(function: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds per call of ``function``.

    On CUDA: ``triton.testing.do_bench`` when triton is installed, else CUDA events. On
    CPU (smoke runs): ``time.perf_counter``. The fallback timers run about
    ``TIMING_REPETITION_MILLISECONDS`` worth of calls after one warm-up call.
    """
    if timer_name(device) == "do_bench":
        return do_bench_milliseconds(function)  # median of do_bench(warmup, rep)
    estimate = max(_elapsed_milliseconds(function, device), 1e-3)
    fewest, most = FALLBACK_TIMED_CALLS
    calls = min(most, max(fewest, int(TIMING_REPETITION_MILLISECONDS / estimate)))
    return statistics.median(_elapsed_milliseconds(function, device) for _ in range(calls))


def release_memory() -> None:
    """Drop unreachable tensors (e.g. held by a caught exception) and return cached memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclasses.dataclass
class PreparedRun:
    """An implementation that ran (and passed its check) on a case, ready to be timed."""

    implementation: Implementation
    case: ContrastiveCase
    settings: RunSettings
    inputs: ContrastiveInputs
    step: Step
    peak_extra_bytes: int | None

    def time_milliseconds(self) -> float:
        """Median milliseconds per forward plus backward, see :func:`time_milliseconds`."""
        return time_milliseconds(self.step, self.settings.torch_device)

    def record(self, milliseconds: float) -> MeasurementRecord:
        """The successful measurement record for ``milliseconds``."""
        return MeasurementRecord.create(
            self.implementation.name,
            self.case,
            "ok",
            dtype=self.settings.dtype,
            milliseconds=milliseconds,
            peak_extra_bytes=self.peak_extra_bytes,
            timer=timer_name(self.settings.torch_device),
        )


def prepare_run(
    implementation_name: str, case: ContrastiveCase, settings: RunSettings = RunSettings()
) -> PreparedRun:
    """Check (blipfast only), build inputs, run once to warm up, then measure memory.

    The memory baseline is taken after the inputs exist and before the implementation is
    set up, so buffers it allocates up front (the floor's ``S`` and ``dS``) or keeps
    between calls count as extra. The peak is read during a second call, so one-off
    compilation and autotuning in the first call do not count.

    Raises:
        ImplementationUnavailableError, IncorrectResultError, torch.OutOfMemoryError, or
        whatever the implementation raises.
    """
    device = settings.torch_device
    implementation = IMPLEMENTATIONS[implementation_name]
    if settings.verify and implementation_name in CHECKED_IMPLEMENTATIONS:
        check_correctness(implementation, case, settings)
        release_memory()

    inputs = make_inputs(case, settings)
    cuda = device.type == "cuda"
    baseline_bytes = torch.cuda.memory_allocated(device) if cuda else 0
    step = implementation.build(case, inputs)
    step()  # warm-up: compilation, autotuning, allocator growth
    _synchronize(device)

    peak_extra_bytes = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step()
    _synchronize(device)
    if cuda:
        peak_extra_bytes = torch.cuda.max_memory_allocated(device) - baseline_bytes
    return PreparedRun(implementation, case, settings, inputs, step, peak_extra_bytes)


Timer = Callable[[Callable[[], float]], float]
"""Calls the zero-argument timing function and returns its result (pytest-benchmark's
``benchmark.pedantic`` wraps it this way)."""


def _measure_once(
    implementation_name: str, case: ContrastiveCase, settings: RunSettings, timer: Timer | None
) -> MeasurementRecord:
    def failure(status: Status, error: BaseException) -> MeasurementRecord:
        reason = f"{type(error).__name__}: {_first_line(str(error))}"
        if isinstance(error, (ImplementationUnavailableError, IncorrectResultError)):
            reason = _first_line(str(error), limit=1000)
        return MeasurementRecord.create(
            implementation_name, case, status, dtype=settings.dtype, reason=reason
        )

    try:
        prepared = prepare_run(implementation_name, case, settings)
        milliseconds = timer(prepared.time_milliseconds) if timer else prepared.time_milliseconds()
        return prepared.record(milliseconds)
    except ImplementationUnavailableError as error:
        return failure("unavailable", error)
    except IncorrectResultError as error:
        return failure("incorrect", error)
    except (torch.OutOfMemoryError, MemoryError) as error:
        return failure("oom", error)
    except Exception as error:  # any other failure of the implementation
        return failure("error", error)


def measure(
    implementation_name: str,
    case: ContrastiveCase,
    settings: RunSettings = RunSettings(),
    *,
    timer: Timer | None = None,
) -> MeasurementRecord:
    """Check, measure memory and time one (implementation, case).

    Never raises for an implementation that is unavailable, incorrect, out of memory or
    failing: it returns a record with that status, and frees the device memory the
    attempt held (the tensors die with the caught exception's frames), so the run can go
    on with the next case. ``timer`` wraps the timing call (pytest-benchmark).
    """
    record = _measure_once(implementation_name, case, settings, timer)
    release_memory()
    return record


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #

_STATUS_CELLS = {"oom": "OOM"}


def _index(records: Sequence[MeasurementRecord]) -> dict[tuple[str, str], MeasurementRecord]:
    return {(record.case, record.implementation): record for record in records}


def _ok_value(
    by_key: dict[tuple[str, str], MeasurementRecord], case: str, implementation: str, field: str
) -> float | None:
    record = by_key.get((case, implementation))
    if record is None or record.status != "ok":
        return None
    return getattr(record, field)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _format(value: float | None, template: str) -> str:
    return "-" if value is None else template.format(value)


def _ordered_names(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """``preferred`` names present in ``values`` first, then the rest in first-seen order."""
    present = dict.fromkeys(values)
    return [name for name in preferred if name in present] + [
        name for name in present if name not in preferred
    ]


def format_markdown_table(records: Sequence[MeasurementRecord]) -> str:
    """Markdown table with one row per (case, implementation).

    speedup = materialized ms / ms; x floor = ms / matmuls-only ms; memory = peak extra
    / materialized peak extra. A failed implementation shows its status (``OOM``,
    ``unavailable``, ``error``, ``incorrect``) in the ms column.
    """
    by_key = _index(records)
    case_names = _ordered_names([record.case for record in records], list(CASES_BY_NAME))
    implementation_names = _ordered_names(
        [record.implementation for record in records], IMPLEMENTATION_NAMES
    )
    header = [
        "case",
        "implementation",
        "ms",
        "peak extra MiB",
        "speedup vs materialized",
        "x matmuls-only",
        "memory vs materialized",
        "TFLOP/s",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for case_name in case_names:
        reference_ms = _ok_value(by_key, case_name, REFERENCE_IMPLEMENTATION, "milliseconds")
        floor_ms = _ok_value(by_key, case_name, FLOOR_IMPLEMENTATION, "milliseconds")
        reference_bytes = _ok_value(
            by_key, case_name, REFERENCE_IMPLEMENTATION, "peak_extra_bytes"
        )
        for implementation_name in implementation_names:
            record = by_key.get((case_name, implementation_name))
            if record is None:
                continue
            label = f"{case_name} ({record_shape(record)})"
            if record.status != "ok":
                cells = [_STATUS_CELLS.get(record.status, record.status)] + ["-"] * 5
            else:
                cells = [
                    _format(record.milliseconds, "{:.3f}"),
                    _format(record.peak_extra_mebibytes, "{:.1f}"),
                    _format(_ratio(reference_ms, record.milliseconds), "{:.2f}x"),
                    _format(_ratio(record.milliseconds, floor_ms), "{:.2f}x"),
                    _format(_ratio(record.peak_extra_bytes, reference_bytes), "{:.2%}"),
                    _format(record.teraflops_per_second, "{:.1f}"),
                ]
            lines.append("| " + " | ".join([label, implementation_name, *cells]) + " |")
    return "\n".join(lines)


def record_shape(record: MeasurementRecord) -> str:
    """``N=... Q=... D=... dtype`` of a record."""
    return f"N={record.batch_size} Q={record.queries} D={record.dim} {record.dtype}"


def _target_line(label: str, value: float | None, text: str, met: bool, target: str) -> str:
    if value is None:
        return f"{label}: not measured (target: {target})"
    return f"{label}: {text}, {'met' if met else 'NOT met'} (target: {target})"


def target_lines(records: Sequence[MeasurementRecord]) -> list[str]:
    """The issue's targets for blipfast, each with its measured value and met / NOT met."""
    by_key = _index(records)

    def ok_milliseconds(implementation: str) -> float | None:
        return _ok_value(by_key, TARGET_CASE, implementation, "milliseconds")

    blipfast_ms = ok_milliseconds(BASELINE_IMPLEMENTATION)
    speedup = _ratio(ok_milliseconds(REFERENCE_IMPLEMENTATION), blipfast_ms)
    floor_ratio = _ratio(blipfast_ms, ok_milliseconds(FLOOR_IMPLEMENTATION))
    memory_ratios = {}
    for case_name in dict.fromkeys(record.case for record in records):
        ratio = _ratio(
            _ok_value(by_key, case_name, BASELINE_IMPLEMENTATION, "peak_extra_bytes"),
            _ok_value(by_key, case_name, REFERENCE_IMPLEMENTATION, "peak_extra_bytes"),
        )
        if ratio is not None:
            memory_ratios[case_name] = ratio
    worst = max(memory_ratios, key=memory_ratios.__getitem__, default=None)
    worst_ratio = memory_ratios.get(worst) if worst else None
    largest = by_key.get((LARGEST_CASE, BASELINE_IMPLEMENTATION))
    return [
        _target_line(
            f"{TARGET_CASE} speedup vs materialized",
            speedup,
            f"{speedup or 0:.2f}x",
            (speedup or 0) >= TARGET_SPEEDUP,
            f">= {TARGET_SPEEDUP:g}x",
        ),
        _target_line(
            f"{TARGET_CASE} time / matmuls-only time",
            floor_ratio,
            f"{floor_ratio or 0:.2f}x",
            floor_ratio is not None and floor_ratio <= TARGET_FLOOR_RATIO,
            f"<= {TARGET_FLOOR_RATIO:g}x",
        ),
        _target_line(
            "blipfast extra memory / materialized extra memory",
            worst_ratio,
            f"at most {worst_ratio or 0:.2%} (at {worst}, over {len(memory_ratios)} cases)",
            worst_ratio is not None and worst_ratio < TARGET_MEMORY_FRACTION,
            f"< {TARGET_MEMORY_FRACTION:.0%}",
        ),
        _target_line(
            f"{LARGEST_CASE} blipfast",
            None if largest is None else 1.0,
            "" if largest is None else _STATUS_CELLS.get(largest.status, largest.status),
            largest is not None and largest.status == "ok",
            "completes on one GPU",
        ),
    ]


def format_report(records: Sequence[MeasurementRecord], environment: dict[str, str]) -> str:
    """The full markdown report: title, environment line, table, targets, notes, failures."""
    dtypes = ", ".join(sorted({record.dtype for record in records})) or _dtype_name(DTYPE)
    timers = ", ".join(sorted({record.timer for record in records if record.timer})) or "none"
    notes = [
        f"Times: median milliseconds of forward plus backward (the loss and the gradients of "
        f"image_feat, text_feat and logit_scale via `torch.autograd.grad`), {dtypes} features; "
        f"timer: {timers} (`do_bench(warmup={TIMING_WARMUP_MILLISECONDS}, "
        f"rep={TIMING_REPETITION_MILLISECONDS})` on a GPU with triton).",
        "peak extra = `max_memory_allocated` during one warm call minus the memory held "
        "before the implementation was set up (the inputs); it includes the returned "
        "gradients and buffers an implementation allocates up front (the matmuls-only "
        "floor's S and dS).",
        "speedup = materialized ms / ms; x matmuls-only = ms / matmuls-only ms; memory = "
        "peak extra / the materialized loss's peak extra.",
        "TFLOP/s counts 6*N*Q*N*D for every implementation (S = I @ T.T, dI = dS @ T, "
        "dT = dS.T @ I with I the (N*Q, D) query matrix).",
        "materialized: `logits = logit_scale * image_feat @ text_feat.T` in the feature "
        "dtype, `F.cross_entropy` in both directions; multi-query: `(N, Q, N)` similarity, "
        "max over Q.",
        f"blipfast was checked against the fp32 materialized loss at N = min(N, "
        f"{CHECK_BATCH_SIZE}) before timing (loss and three gradients, max relative error "
        f"< {RELATIVE_TOLERANCES[DTYPE]:g} in {_dtype_name(DTYPE)}).",
    ]
    failures = [
        f"- {record.implementation} on {record.case} "
        f"({_STATUS_CELLS.get(record.status, record.status)}): {record.reason}"
        for record in records
        if record.status != "ok"
    ]
    lines = [
        "# Contrastive (ITC) loss benchmark",
        "",
        environment_header(environment),
        "",
        format_markdown_table(records),
        "",
        "## Targets",
        "",
        *(f"- {line}" for line in target_lines(records)),
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in notes),
        *(["", "## Not measured", "", *failures] if failures else []),
    ]
    return "\n".join(lines) + "\n"


MEASUREMENT_IDENTITY: tuple[str, ...] = ("case", "implementation")
"""The fields that identify a measurement: a rerun's record replaces the earlier one with
the same values (:func:`write_results`)."""


def records_from_rows(rows: Sequence[dict[str, Any]]) -> list[MeasurementRecord]:
    """The measurement records of a ``.jsonl``'s rows (derived fields such as TFLOP/s are
    recomputed; rows that do not fit are left out)."""
    records = [dataclass_from_row(MeasurementRecord, row) for row in rows]
    return [record for record in records if record is not None]


def format_result_file(content: ResultFile) -> str:
    """The markdown report of a ``.jsonl`` result file's content."""
    return format_report(records_from_rows(content.measurements),
                         content.environment or UNKNOWN_ENVIRONMENT)


def write_results(
    records: Sequence[MeasurementRecord], output_directory: str | Path, environment: dict[str, str]
) -> tuple[Path, Path]:
    """Write ``contrastive-<device>-<date>.jsonl`` and ``.md`` into ``output_directory``.

    ``environment`` comes from :func:`collect_environment`. The first ``.jsonl`` line is
    the environment (``"record_type": "environment"``), each following line one
    measurement (``"record_type": "measurement"``). The ``.jsonl`` is the source of
    truth: ``records`` are merged into an existing one for the same device and day (a
    record replaces the earlier one of the same case and implementation, every other
    earlier one is kept), and the ``.md`` is then regenerated from the merged records.
    Each file is replaced in one step, so this can run after every measurement.
    """
    return write_day_results(
        output_directory,
        f"contrastive-{device_slug(environment['device'])}-{environment['date']}",
        [{"record_type": "measurement", **record.to_dict()} for record in records],
        MEASUREMENT_IDENTITY,
        format_result_file,
        environment,
    )
