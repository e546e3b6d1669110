"""Shared definitions for the attention benchmarks.

Both ``bench/test_attention_speed.py`` (pytest-benchmark) and ``bench/run_attention.py``
(standalone script) import this module, so the benchmark shapes, the input
construction, the implementations under comparison, the correctness check, the
timing and the result formatting live in exactly one place.

Every implementation receives the same ``(batch, length, heads, head_dim)``
tensors. The ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) peers
see them through ``.transpose(1, 2)`` views, which is the
``(batch, heads, length, head_dim)`` layout SDPA expects, so no data is copied
and every implementation reads identical values.

Heavy or optional dependencies (``triton``, ``blipfast``, ``flash_attn``) are
imported lazily inside the functions that need them, so this module can be
imported on a machine without a GPU or without those packages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from result_files import (
    UNKNOWN_ENVIRONMENT, ResultFile, blipfast_revision, dataclass_from_row, write_day_results)

Mode = Literal["fwd", "fwd_bwd"]
Status = Literal["ok", "unsupported", "incorrect", "skipped"]

MODES: tuple[Mode, ...] = ("fwd", "fwd_bwd")
"""``fwd``: forward only under ``torch.no_grad``; ``fwd_bwd``: forward plus backward."""

DTYPE = torch.bfloat16
DEFAULT_SEED = 0

TIMING_WARMUP_MILLISECONDS = 25
TIMING_REPETITION_MILLISECONDS = 100

OUTPUT_ABSOLUTE_TOLERANCE = 2e-2
"""Largest allowed ``max |output - reference|`` for a bfloat16 attention output."""

GRADIENT_RELATIVE_TOLERANCE = 2e-2
"""Largest allowed ``max |grad - reference| / max |reference|`` for each input gradient."""

SHORTEST_TEXT_LENGTH = 5
"""Smallest number of valid (attended) keys in a padded text row."""

BASELINE_IMPLEMENTATION = "blipfast"
PEER_IMPLEMENTATIONS: tuple[str, ...] = (
    "sdpa_flash",
    "sdpa_cudnn",
    "sdpa_efficient",
    "sdpa_math",
    "flash_attn",
)
IMPLEMENTATION_NAMES: tuple[str, ...] = (BASELINE_IMPLEMENTATION, *PEER_IMPLEMENTATIONS)


# --------------------------------------------------------------------------- #
# Benchmark shapes
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One named attention problem size taken from a BLIP model."""

    name: str
    batch: int
    heads: int
    query_length: int
    key_length: int
    head_dim: int
    causal: bool = False
    key_padding: bool = False

    @property
    def mask_description(self) -> str:
        """Human-readable masking mode, e.g. ``causal + key padding``."""
        parts = []
        if self.causal:
            parts.append("causal")
        if self.key_padding:
            parts.append("key padding")
        return " + ".join(parts) if parts else "none"

    @property
    def shape_description(self) -> str:
        """Compact shape text, e.g. ``B=256 H=12 Lq=35 Lk=35 D=64``."""
        return (
            f"B={self.batch} H={self.heads} Lq={self.query_length} "
            f"Lk={self.key_length} D={self.head_dim}"
        )

    def attended_pairs(self) -> int:
        """Number of (query, key) pairs that take part in attention, per batch and head.

        Causal masking is counted exactly: with the bottom-right alignment, query
        ``i`` sees keys ``j <= i + key_length - query_length``. Key padding is
        deliberately ignored, because the padded lengths are random and every
        implementation is credited with the same nominal work.
        """
        if not self.causal:
            return self.query_length * self.key_length
        offset = self.key_length - self.query_length
        return sum(
            max(0, min(self.key_length, query_index + offset + 1))
            for query_index in range(self.query_length)
        )

    def minimum_bytes(self, mode: Mode, element_size: int) -> int:
        """Bytes one call must move at the least: the forward reads q, k, v and writes
        the output; the backward reads q, k, v, the output and its gradient and writes the
        three input gradients. Masks and per-row statistics (a few bytes a row) are left
        out, so this is a lower bound."""
        query = self.batch * self.query_length * self.heads * self.head_dim
        key = self.batch * self.key_length * self.heads * self.head_dim
        forward = 2 * query + 2 * key
        if mode == "fwd":
            return forward * element_size
        return (forward + 4 * query + 4 * key) * element_size

    def floating_point_operations(self, mode: Mode) -> int:
        """FLOPs of one call in ``mode``.

        The forward pass is two matrix products (``Q @ K^T`` and ``P @ V``), each
        ``2 * head_dim`` FLOPs per attended pair, hence ``4 * B * H * pairs * D``.
        The backward pass is counted as 2.5 forward passes (five matrix
        products), so forward plus backward is 3.5 forward passes.
        """
        forward = 4 * self.batch * self.heads * self.attended_pairs() * self.head_dim
        if mode == "fwd":
            return forward
        return forward * 7 // 2


CASES: tuple[AttentionCase, ...] = (
    AttentionCase("text_bidir_pad", 256, 12, 35, 35, 64, key_padding=True),
    AttentionCase("text_causal_pad", 256, 12, 35, 35, 64, causal=True, key_padding=True),
    AttentionCase("text_to_image_cross", 256, 12, 35, 577, 64),
    AttentionCase("vit_b16_384_self", 64, 12, 577, 577, 64),
    AttentionCase("vit_g_self", 64, 16, 257, 257, 88),
    AttentionCase("qformer_cross", 256, 12, 32, 257, 64),
    # One generated token for each of 64 captions, over a 35-token cache and over the
    # image: microseconds of GPU work, so these show the per-call (host) overhead.
    AttentionCase("decode_self_cache", 64, 12, 1, 35, 64, causal=True, key_padding=True),
    AttentionCase("decode_cross_image", 64, 12, 1, 577, 64),
)
CASES_BY_NAME: dict[str, AttentionCase] = {case.name: case for case in CASES}


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class AttentionInputs:
    """Tensors for one benchmark call, all in ``(batch, length, heads, head_dim)`` layout."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output_gradient: torch.Tensor
    """Fixed upstream gradient used by the backward pass, shaped like the output."""
    key_padding_mask: torch.Tensor | None
    """Boolean ``(batch, key_length)``; ``True`` marks keys that may be attended."""


def make_inputs(
    case: AttentionCase,
    *,
    requires_grad: bool,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = DTYPE,
    seed: int = DEFAULT_SEED,
) -> AttentionInputs:
    """Build reproducible random inputs for ``case``.

    The same ``seed`` always yields the same tensors, so every implementation
    measured for a case sees identical data. With key padding, row ``b`` keeps
    its first ``length[b]`` keys, where ``length[b]`` is drawn uniformly from
    ``[SHORTEST_TEXT_LENGTH, key_length]``; no row is ever fully masked.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def random_tensor(length: int) -> torch.Tensor:
        shape = (case.batch, length, case.heads, case.head_dim)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    query = random_tensor(case.query_length)
    key = random_tensor(case.key_length)
    value = random_tensor(case.key_length)
    output_gradient = random_tensor(case.query_length)

    key_padding_mask = None
    if case.key_padding:
        # Lengths come from a CPU generator so they do not depend on the device.
        length_generator = torch.Generator().manual_seed(seed)
        shortest = min(SHORTEST_TEXT_LENGTH, case.key_length)
        valid_lengths = torch.randint(
            shortest, case.key_length + 1, (case.batch,), generator=length_generator
        ).to(device)
        positions = torch.arange(case.key_length, device=device)
        key_padding_mask = positions[None, :] < valid_lengths[:, None]

    for tensor in (query, key, value):
        tensor.requires_grad_(requires_grad)
    return AttentionInputs(query, key, value, output_gradient, key_padding_mask)


def sdpa_attention_mask(
    case: AttentionCase, key_padding_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Return ``(attn_mask, is_causal)`` arguments for SDPA that express ``case``.

    SDPA's ``is_causal`` is top-left aligned and cannot be combined with
    ``attn_mask``, so it is only used for causal attention without padding when
    ``query_length == key_length`` (where both alignments agree). Every other
    causal case gets an explicit boolean mask with the bottom-right alignment
    ``key_index <= query_index + key_length - query_length``, combined with the
    key padding. Padding alone is passed as a ``(batch, 1, 1, key_length)`` mask.
    """
    if case.causal and key_padding_mask is None and case.query_length == case.key_length:
        return None, True

    attention_mask = None
    if key_padding_mask is not None:
        attention_mask = key_padding_mask[:, None, None, :]
    if case.causal:
        query_positions = torch.arange(case.query_length, device=device)[:, None]
        key_positions = torch.arange(case.key_length, device=device)[None, :]
        causal_mask = key_positions <= query_positions + (case.key_length - case.query_length)
        causal_mask = causal_mask[None, None, :, :]
        attention_mask = causal_mask if attention_mask is None else attention_mask & causal_mask
    return attention_mask, False


# --------------------------------------------------------------------------- #
# Implementations
# --------------------------------------------------------------------------- #


class NotApplicableError(Exception):
    """The implementation does not apply to this case (e.g. not installed, or no mask support)."""


class UnsupportedImplementationError(Exception):
    """The implementation raised an error when run on this case."""


class IncorrectResultError(AssertionError):
    """The implementation ran but its result does not match the reference."""


ForwardFunction = Callable[[], torch.Tensor]
"""Zero-argument callable returning the attention output in ``(B, Lq, H, D)`` layout."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention implementation under comparison."""

    name: str
    build_forward: Callable[[AttentionCase, AttentionInputs], ForwardFunction]
    """Prepare everything that should not be timed and return the forward call."""
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    """Context entered around every call, e.g. to force an SDPA backend."""


def _build_blipfast_forward(case: AttentionCase, inputs: AttentionInputs) -> ForwardFunction:
    try:
        from blipfast import ops
    except ImportError as error:
        raise UnsupportedImplementationError(f"blipfast is not importable: {error}") from error
    attention = ops.attention

    def forward() -> torch.Tensor:
        return attention(
            inputs.query,
            inputs.key,
            inputs.value,
            causal=case.causal,
            key_padding_mask=inputs.key_padding_mask,
        )

    return forward


def _build_sdpa_forward(case: AttentionCase, inputs: AttentionInputs) -> ForwardFunction:
    attention_mask, is_causal = sdpa_attention_mask(
        case, inputs.key_padding_mask, inputs.query.device
    )
    # Views in SDPA's (batch, heads, length, head_dim) layout; no data is copied.
    query = inputs.query.transpose(1, 2)
    key = inputs.key.transpose(1, 2)
    value = inputs.value.transpose(1, 2)
    scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention

    def forward() -> torch.Tensor:
        output = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=is_causal
        )
        return output.transpose(1, 2)

    return forward


def _import_flash_attention_function() -> tuple[Callable[..., Any], str]:
    """Return ``(flash_attn_func, module name)``, preferring flash-attn-4 (``flash_attn.cute``)."""
    try:
        from flash_attn.cute import flash_attn_func

        return flash_attn_func, "flash_attn.cute"
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func, "flash_attn"
    except ImportError as error:
        raise NotApplicableError(f"flash_attn is not installed: {error}") from error


def _build_flash_attn_forward(case: AttentionCase, inputs: AttentionInputs) -> ForwardFunction:
    if inputs.key_padding_mask is not None:
        raise NotApplicableError("flash_attn is only benchmarked on shapes without key padding")
    flash_attn_func, _ = _import_flash_attention_function()

    def forward() -> torch.Tensor:
        # flash_attn uses the (batch, length, heads, head_dim) layout and
        # bottom-right aligned causal masking, like blipfast.
        result = flash_attn_func(inputs.query, inputs.key, inputs.value, causal=case.causal)
        # flash-attn-4 returns (output, log_sum_exp); flash-attn-2 returns the output.
        return result[0] if isinstance(result, tuple) else result

    return forward


def _sdpa_backend_context(backend_name: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    def context() -> contextlib.AbstractContextManager[Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, backend_name))

    return context


IMPLEMENTATIONS: dict[str, Implementation] = {
    "blipfast": Implementation("blipfast", _build_blipfast_forward),
    "sdpa_flash": Implementation(
        "sdpa_flash", _build_sdpa_forward, _sdpa_backend_context("FLASH_ATTENTION")
    ),
    "sdpa_cudnn": Implementation(
        "sdpa_cudnn", _build_sdpa_forward, _sdpa_backend_context("CUDNN_ATTENTION")
    ),
    "sdpa_efficient": Implementation(
        "sdpa_efficient", _build_sdpa_forward, _sdpa_backend_context("EFFICIENT_ATTENTION")
    ),
    "sdpa_math": Implementation("sdpa_math", _build_sdpa_forward, _sdpa_backend_context("MATH")),
    "flash_attn": Implementation("flash_attn", _build_flash_attn_forward),
}
assert tuple(IMPLEMENTATIONS) == IMPLEMENTATION_NAMES


# --------------------------------------------------------------------------- #
# Correctness check
# --------------------------------------------------------------------------- #


def _tensors_of(result: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def reference_results(
    case: AttentionCase, inputs: AttentionInputs, mode: Mode
) -> tuple[torch.Tensor, ...]:
    """Compute the fp32 reference with SDPA's math backend on the upcast inputs.

    Returns ``(output,)`` for ``fwd`` and ``(output, query_grad, key_grad,
    value_grad)`` for ``fwd_bwd``, all in ``(B, L, H, D)`` layout.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    upcast = [
        tensor.detach().float().requires_grad_(mode == "fwd_bwd")
        for tensor in (inputs.query, inputs.key, inputs.value)
    ]
    upcast_inputs = dataclasses.replace(
        inputs,
        query=upcast[0],
        key=upcast[1],
        value=upcast[2],
        output_gradient=inputs.output_gradient.float(),
    )
    forward = _build_sdpa_forward(case, upcast_inputs)
    with sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(mode == "fwd_bwd"):
        output = forward()
        if mode == "fwd":
            return (output.detach(),)
        gradients = torch.autograd.grad(output, upcast, upcast_inputs.output_gradient)
    return (output.detach(), *gradients)


def check_correctness(
    implementation_name: str,
    case: AttentionCase,
    mode: Mode,
    inputs: AttentionInputs,
    results: torch.Tensor | Sequence[torch.Tensor],
) -> None:
    """Raise :class:`IncorrectResultError` if ``results`` do not match the fp32 reference.

    The output must satisfy ``max |output - reference| < OUTPUT_ABSOLUTE_TOLERANCE``.
    Gradients, whose scale varies with the shape, must satisfy
    ``max |grad - reference| / max |reference| < GRADIENT_RELATIVE_TOLERANCE``.
    """
    names = ("output", "query_grad", "key_grad", "value_grad")
    expected_tensors = reference_results(case, inputs, mode)
    actual_tensors = _tensors_of(results)
    if len(actual_tensors) != len(expected_tensors):
        raise IncorrectResultError(
            f"{implementation_name} on {case.name}/{mode}: expected "
            f"{len(expected_tensors)} result tensors, got {len(actual_tensors)}"
        )
    problems = []
    for name, actual, expected in zip(names, actual_tensors, expected_tensors):
        if actual.shape != expected.shape:
            problems.append(f"{name} shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            continue
        error = (actual.float() - expected).abs().max().item()
        if name == "output":
            allowed, measured = OUTPUT_ABSOLUTE_TOLERANCE, error
            description = f"max abs error {error:.3e} (limit {allowed:.1e})"
        else:
            scale = max(expected.abs().max().item(), 1e-6)
            allowed, measured = GRADIENT_RELATIVE_TOLERANCE, error / scale
            description = (
                f"max abs error {error:.3e} / max abs reference {scale:.3e} = "
                f"{measured:.3e} (limit {allowed:.1e})"
            )
        if not measured < allowed:  # also catches NaN
            problems.append(f"{name}: {description}")
    if problems:
        raise IncorrectResultError(
            f"{implementation_name} on {case.name}/{mode} does not match the fp32 "
            "math reference: " + "; ".join(problems)
        )


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class MeasurementRecord:
    """One result row: an implementation timed on one case in one mode."""

    case: str
    mode: Mode
    implementation: str
    status: Status
    milliseconds: float | None
    """Median time per call from ``triton.testing.do_bench`` (GPU events)."""
    teraflops_per_second: float | None
    floating_point_operations: int
    batch: int
    heads: int
    query_length: int
    key_length: int
    head_dim: int
    masking: str
    dtype: str
    reason: str | None = None
    """Why the implementation was skipped, unsupported or incorrect."""

    @classmethod
    def create(
        cls,
        implementation_name: str,
        case: AttentionCase,
        mode: Mode,
        status: Status,
        *,
        milliseconds: float | None = None,
        reason: str | None = None,
    ) -> MeasurementRecord:
        """Build a record, deriving TFLOP/s from ``milliseconds`` when given."""
        operations = case.floating_point_operations(mode)
        throughput = None
        if milliseconds is not None and milliseconds > 0:
            throughput = operations / (milliseconds * 1e-3) / 1e12
        return cls(
            case=case.name,
            mode=mode,
            implementation=implementation_name,
            status=status,
            milliseconds=milliseconds,
            teraflops_per_second=throughput,
            floating_point_operations=operations,
            batch=case.batch,
            heads=case.heads,
            query_length=case.query_length,
            key_length=case.key_length,
            head_dim=case.head_dim,
            masking=case.mask_description,
            dtype=str(DTYPE).removeprefix("torch."),
            reason=reason,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary of all fields."""
        return dataclasses.asdict(self)


def time_milliseconds(function: Callable[[], Any]) -> float:
    """Median time of ``function`` in milliseconds, measured with CUDA events by Triton."""
    from triton.testing import do_bench

    return float(
        do_bench(
            function,
            warmup=TIMING_WARMUP_MILLISECONDS,
            rep=TIMING_REPETITION_MILLISECONDS,
            return_mode="median",
        )
    )


def _first_line(text: str, limit: int = 300) -> str:
    """First line of ``text``, shortened to ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _without_source_location(message: str) -> str:
    """A warning message on one line, without PyTorch's "(Triggered internally at ...)" suffix."""
    message = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", message)
    return _first_line(" ".join(message.split()))


@dataclasses.dataclass
class PreparedRun:
    """An implementation that ran once successfully on a case and is ready to be timed."""

    implementation: Implementation
    case: AttentionCase
    mode: Mode
    inputs: AttentionInputs
    function: Callable[[], Any]
    """The timed call: forward, or forward plus backward returning (output, *grads)."""

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.implementation.context())
            if self.mode == "fwd":
                stack.enter_context(torch.no_grad())
            yield

    def run_once(self) -> Any:
        """Run the timed call once (inside the implementation's context) and wait for it."""
        with self._context():
            result = self.function()
        torch.cuda.synchronize()
        return result

    def time_milliseconds(self) -> float:
        """Median milliseconds per call, see :func:`time_milliseconds`."""
        with self._context():
            return time_milliseconds(self.function)

    def record(self, milliseconds: float) -> MeasurementRecord:
        """The successful measurement record for ``milliseconds``."""
        return MeasurementRecord.create(
            self.implementation.name, self.case, self.mode, "ok", milliseconds=milliseconds
        )


def prepare_run(
    implementation_name: str,
    case: AttentionCase,
    mode: Mode,
    *,
    seed: int = DEFAULT_SEED,
    verify: bool = True,
) -> PreparedRun:
    """Build inputs, run the implementation once and check it against the reference.

    Raises:
        NotApplicableError: the implementation does not apply to ``case``.
        UnsupportedImplementationError: the implementation raised while running.
        IncorrectResultError: the result does not match the fp32 math reference.
    """
    implementation = IMPLEMENTATIONS[implementation_name]
    inputs = make_inputs(case, requires_grad=mode == "fwd_bwd", seed=seed)
    differentiable_inputs = (inputs.query, inputs.key, inputs.value)

    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        try:
            forward = implementation.build_forward(case, inputs)
            if mode == "fwd":
                function: Callable[[], Any] = forward
            else:

                def function() -> tuple[torch.Tensor, ...]:
                    output = forward()
                    gradients = torch.autograd.grad(
                        output, differentiable_inputs, inputs.output_gradient
                    )
                    return (output, *gradients)

            prepared = PreparedRun(implementation, case, mode, inputs, function)
            result = prepared.run_once()
        except (NotApplicableError, UnsupportedImplementationError):
            raise
        except Exception as error:  # any failure of the implementation means "unsupported"
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            details = [f"{type(error).__name__}: {_first_line(str(error))}"]
            # SDPA explains why a forced backend was rejected only through warnings.
            for warning in caught_warnings:
                explanation = _without_source_location(str(warning.message))
                uninformative = explanation.endswith(":") or "runtime disabled" in explanation
                if explanation and not uninformative and explanation not in details:
                    details.append(explanation)
            raise UnsupportedImplementationError(" | ".join(details)) from error

    if verify:
        check_correctness(implementation_name, case, mode, inputs, result)
    del result
    return prepared


def measure(
    implementation_name: str,
    case: AttentionCase,
    mode: Mode,
    *,
    seed: int = DEFAULT_SEED,
    verify: bool = True,
) -> MeasurementRecord:
    """Prepare, verify and time one (implementation, case, mode); never raises for
    unsupported or incorrect implementations, it records them instead."""
    try:
        prepared = prepare_run(implementation_name, case, mode, seed=seed, verify=verify)
    except NotApplicableError as error:
        return MeasurementRecord.create(
            implementation_name, case, mode, "skipped", reason=str(error)
        )
    except UnsupportedImplementationError as error:
        return MeasurementRecord.create(
            implementation_name, case, mode, "unsupported", reason=str(error)
        )
    except IncorrectResultError as error:
        return MeasurementRecord.create(
            implementation_name, case, mode, "incorrect", reason=str(error)
        )
    return prepared.record(prepared.time_milliseconds())


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def collect_environment() -> dict[str, str]:
    """Device and software versions for the results header; on a GPU also its measured
    bf16 matmul rate and copy bandwidth (``bench/device_rates.py``), for the floors."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda_available = torch.cuda.is_available()
    environment = {
        "device": torch.cuda.get_device_name() if cuda_available else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "blipfast": blipfast_revision(),
        "date": datetime.date.today().isoformat(),
    }
    if cuda_available:
        from device_rates import copy_bandwidth, matmul_rate

        environment["bf16_matmul_tflops"] = f"{matmul_rate(torch.bfloat16) / 1e12:.0f}"
        environment["copy_bandwidth_gbps"] = f"{copy_bandwidth() / 1e9:.0f}"
    return environment


def has_measured_rates(environment: dict[str, str] | None) -> bool:
    """Whether ``environment`` carries the GPU's measured rates (:func:`collect_environment`
    on a GPU), which the floors need."""
    return bool(environment) and "bf16_matmul_tflops" in environment


def floor_milliseconds(case: AttentionCase, mode: Mode,
                       environment: dict[str, str] | None) -> float | None:
    """The case's floor on this device: the larger of its FLOPs over the measured bf16
    matmul rate and its minimum bytes over the measured bandwidth; None when the
    environment has no measured rates (no GPU)."""
    if not has_measured_rates(environment):
        return None
    flops_per_second = float(environment["bf16_matmul_tflops"]) * 1e12
    bytes_per_second = float(environment["copy_bandwidth_gbps"]) * 1e9
    element_size = torch.empty((), dtype=DTYPE).element_size()
    seconds = max(case.floating_point_operations(mode) / flops_per_second,
                  case.minimum_bytes(mode, element_size) / bytes_per_second)
    return seconds * 1e3


def device_slug(device_name: str) -> str:
    """File-name friendly device name, e.g. ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown-device"


def _format_cell(record: MeasurementRecord | None) -> str:
    if record is None or record.status == "skipped":
        return "-"
    if record.status == "ok" and record.milliseconds is not None:
        return f"{record.milliseconds:.4f}"
    return record.status


def format_markdown_table(records: Sequence[MeasurementRecord],
                          environment: dict[str, str] | None = None) -> str:
    """Markdown table with one row per (shape, mode).

    Columns: shape, mode, blipfast ms, the fastest successful peer and its ms,
    the speedup (peer ms / blipfast ms, above 1 means blipfast is faster), then
    the ms of every peer. Cells read ``unsupported`` or ``incorrect`` when an
    implementation failed and ``-`` when it was not run. With an ``environment`` that
    has measured rates, two more columns: the floor (:func:`floor_milliseconds`) and
    blipfast's time as a multiple of it.
    """
    with_floor = has_measured_rates(environment)
    by_key = {(record.case, record.mode, record.implementation): record for record in records}
    measured_rows = {(record.case, record.mode) for record in records}
    header = [
        "shape",
        "mode",
        f"{BASELINE_IMPLEMENTATION} ms",
        "best peer",
        "best peer ms",
        "speedup",
        *(f"{peer} ms" for peer in PEER_IMPLEMENTATIONS),
        *(("floor ms", f"{BASELINE_IMPLEMENTATION} / floor") if with_floor else ()),
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---", "---:", "---", "---:"] + ["---:"] * (len(header) - 5)) + "|",
    ]
    for case in CASES:
        for mode in MODES:
            if (case.name, mode) not in measured_rows:
                continue
            baseline = by_key.get((case.name, mode, BASELINE_IMPLEMENTATION))
            peers = {peer: by_key.get((case.name, mode, peer)) for peer in PEER_IMPLEMENTATIONS}
            timed_peers = {
                peer: record.milliseconds
                for peer, record in peers.items()
                if record is not None and record.status == "ok" and record.milliseconds is not None
            }
            best_peer_name, best_peer_cell, speedup_cell = "-", "-", "-"
            if timed_peers:
                best_peer_name = min(timed_peers, key=timed_peers.__getitem__)
                best_peer_milliseconds = timed_peers[best_peer_name]
                best_peer_cell = f"{best_peer_milliseconds:.4f}"
                if baseline is not None and baseline.status == "ok" and baseline.milliseconds:
                    speedup_cell = f"{best_peer_milliseconds / baseline.milliseconds:.2f}x"
            row = [
                f"{case.name} ({case.shape_description}, mask: {case.mask_description})",
                mode,
                _format_cell(baseline),
                best_peer_name,
                best_peer_cell,
                speedup_cell,
                *(_format_cell(peers[peer]) for peer in PEER_IMPLEMENTATIONS),
            ]
            if with_floor:
                floor = floor_milliseconds(case, mode, environment)
                row.append(f"{floor:.4f}")
                row.append(f"{baseline.milliseconds / floor:.2f}x"
                           if baseline is not None and baseline.status == "ok"
                           and baseline.milliseconds else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment_header(environment: dict[str, str]) -> str:
    """One-line description of the machine and software versions."""
    header = (
        f"device: {environment['device']} | torch {environment['torch']} | "
        f"triton {environment['triton']} | CUDA {environment['cuda']} | "
        + (f"{environment['blipfast']} | " if "blipfast" in environment else "")
        + f"date {environment['date']}"
    )
    if has_measured_rates(environment):
        header += (f" | measured: bf16 matmul {environment['bf16_matmul_tflops']} TFLOP/s, "
                   f"copy {environment['copy_bandwidth_gbps']} GB/s")
    return header


def format_report(records: Sequence[MeasurementRecord], environment: dict[str, str]) -> str:
    """The full markdown report: title, environment line, table and notes."""
    notes = [
        f"Times are the median of `triton.testing.do_bench(warmup={TIMING_WARMUP_MILLISECONDS}, "
        f"rep={TIMING_REPETITION_MILLISECONDS})` in milliseconds, {str(DTYPE).removeprefix('torch.')} inputs.",
        "`fwd` runs under `torch.no_grad`; `fwd_bwd` is forward plus backward of a fixed output gradient.",
        "speedup = best peer ms / blipfast ms (above 1 means blipfast is faster).",
        "FLOP counts (TFLOP/s in the .jsonl) ignore key padding; causal masking is counted exactly.",
        "floor = max(FLOPs / measured bf16 matmul rate, minimum bytes / measured copy "
        "bandwidth), minimum bytes being q, k, v and the output (and for the backward the "
        "output gradient and the three input gradients) each moved once.",
    ]
    unsupported = [
        record for record in records if record.status in ("unsupported", "incorrect")
    ]
    lines = [
        "# Attention benchmark",
        "",
        environment_header(environment),
        "",
        format_markdown_table(records, environment),
        "",
        *(f"- {note}" for note in notes),
    ]
    if unsupported:
        lines += ["", "## Failures", ""]
        lines += [
            f"- {record.implementation} on {record.case}/{record.mode} ({record.status}): {record.reason}"
            for record in unsupported
        ]
    return "\n".join(lines) + "\n"


MEASUREMENT_IDENTITY: tuple[str, ...] = ("case", "mode", "implementation")
"""The fields that identify a measurement: a rerun's record replaces the earlier one with
the same values (:func:`write_results`)."""


def records_from_rows(rows: Sequence[dict[str, Any]]) -> list[MeasurementRecord]:
    """The measurement records of a ``.jsonl``'s rows (rows that do not fit are left out)."""
    records = [dataclass_from_row(MeasurementRecord, row) for row in rows]
    return [record for record in records if record is not None]


def format_result_file(content: ResultFile) -> str:
    """The markdown report of a ``.jsonl`` result file's content."""
    return format_report(records_from_rows(content.measurements),
                         content.environment or UNKNOWN_ENVIRONMENT)


def write_results(
    records: Sequence[MeasurementRecord],
    output_directory: str | Path,
    environment: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Write ``attention-<device>-<date>.jsonl`` and ``.md`` into ``output_directory``.

    The first line of the ``.jsonl`` is the environment (``"record_type":
    "environment"``); every following line is one measurement (``"record_type":
    "measurement"``). The ``.jsonl`` is the source of truth: ``records`` are merged into
    an existing one for the same device and day (a record replaces the earlier one of the
    same case, mode and implementation, every other earlier one is kept), and the ``.md``
    is then regenerated from the merged records. Each file is replaced in one step
    (:func:`result_files.write_atomically`), so this can run after every measurement.
    """
    environment = environment or collect_environment()
    return write_day_results(
        output_directory,
        f"attention-{device_slug(environment['device'])}-{environment['date']}",
        [{"record_type": "measurement", **record.to_dict()} for record in records],
        MEASUREMENT_IDENTITY,
        format_result_file,
        environment,
    )
