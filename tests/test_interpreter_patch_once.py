"""The Triton interpreter patching ``triton.language`` per launch, not at every helper call
(``interpreter_patch_once.py``, installed by conftest.py): far fewer patchings than the
interpreter alone makes, the same results to the bit, and ``triton.language`` restored
after every launch, a failed one too; the interpreter's integer-overflow checks turned off,
because they check nothing there; and the processes a distributed test spawns run with
both interpreter patches and that option, as pytest's own do (``interpreter_setup.py``)."""

import dataclasses


import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import interpreter_like_gpu
import interpreter_patch_once
import interpreter_setup
from distributed_harness import run_on_ranks

pytestmark = pytest.mark.interpreter

SIZE = 16
CALLS = 4
PROGRAMS = 3


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _helpers_kernel(X, Out, SIZE: tl.constexpr, CALLS: tl.constexpr):
    """Per program: Out[row] = sum over CALLS of x * 1.5 ** call, then sum(x) and max(x)
    (``tl.sum``, ``tl.max``: ``@triton.jit`` helpers of triton.language.standard)."""
    row = tl.program_id(0)
    offsets = tl.arange(0, SIZE)
    x = tl.load(X + row * SIZE + offsets)
    total = tl.zeros((SIZE,), tl.float32)
    for call in tl.static_range(CALLS):
        total += _scaled(x, 1.5 ** call)
    tl.store(Out + row * (SIZE + 2) + offsets, total)
    tl.store(Out + row * (SIZE + 2) + SIZE, tl.sum(x, axis=0))
    tl.store(Out + row * (SIZE + 2) + SIZE + 1, tl.max(x, axis=0))


@triton.jit
def _failing_helper(x, SIZE: tl.constexpr):
    tl.static_assert(SIZE < 0, "this helper always fails")
    return x


@triton.jit
def _failing_kernel(X, SIZE: tl.constexpr):
    x = tl.load(X + tl.arange(0, SIZE))
    tl.store(X + tl.arange(0, SIZE), _failing_helper(x, SIZE))


def _run_helpers_kernel(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(PROGRAMS, SIZE + 2)
    _helpers_kernel[(PROGRAMS,)](x, out, SIZE=SIZE, CALLS=CALLS)
    return out


def _module_patchings(monkeypatch, run) -> tuple[object, int]:
    """``run()``'s result and how many times the interpreter patched a language module
    (``tl`` or ``tl.core``) meanwhile: calls of its ``_patch_lang_core``, one per module
    per patching."""
    patchings = 0
    original = interpreter._patch_lang_core

    def counted(*args, **kwargs):
        nonlocal patchings
        patchings += 1
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(interpreter, "_patch_lang_core", counted)
        result = run()
    return result, patchings


def _without_the_patch(monkeypatch) -> None:
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.__wrapped__)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__",
                        interpreter.GridExecutor.__call__.__wrapped__)


def test_installed():
    assert getattr(interpreter._patch_lang, interpreter_patch_once._INSTALLED_MARK, False)


def test_few_patchings_per_launch_and_the_same_results(monkeypatch):
    x = torch.randn(PROGRAMS, SIZE)
    expected = torch.stack([sum(row * 1.5 ** call for call in range(CALLS)) for row in x])
    patched, patched_patchings = _module_patchings(monkeypatch, lambda: _run_helpers_kernel(x))
    # the launch patches tl; the first tl.sum (triton.language.standard, whose globals
    # hold tl.core, and tl too once the interpreter has rewritten one of its functions:
    # it copies its own globals into the function's) patches them both
    assert patched_patchings <= 3, patched_patchings
    torch.testing.assert_close(patched[:, :SIZE], expected)
    torch.testing.assert_close(patched[:, SIZE], x.sum(1))
    assert torch.equal(patched[:, SIZE + 1], x.max(1).values)

    _without_the_patch(monkeypatch)
    alone, alone_patchings = _module_patchings(monkeypatch, lambda: _run_helpers_kernel(x))
    # what the patch saves: a patching at every helper call
    assert alone_patchings >= 1 + PROGRAMS * (CALLS + 2), alone_patchings
    assert torch.equal(patched, alone)


def test_the_language_is_restored_after_a_launch_and_after_a_failed_one():
    originals = {name: getattr(tl, name) for name in ("load", "store", "dot", "arange")}
    assert all(tl.core.is_builtin(member) for member in originals.values())
    x = torch.randn(PROGRAMS, SIZE)
    first = _run_helpers_kernel(x)
    assert {name: getattr(tl, name) for name in originals} == originals
    assert interpreter_patch_once._patched_in_this_launch is None

    with pytest.raises(Exception, match="this helper always fails"):
        _failing_kernel[(1,)](torch.zeros(SIZE), SIZE=SIZE)
    assert {name: getattr(tl, name) for name in originals} == originals
    assert interpreter_patch_once._patched_in_this_launch is None
    assert torch.equal(_run_helpers_kernel(x), first)  # the next launch patches afresh


def test_a_helper_whose_globals_gain_a_language_module_is_scanned_again():
    """Rewriting a function, the interpreter adds ``tl`` to its module's globals in place:
    the remembered scan of a function there must see it."""
    namespace: dict = {}
    exec("def helper():\n    return 0\n", namespace)
    helper, languages = namespace["helper"], (tl, tl.core)
    assert interpreter_patch_once._language_modules(helper, languages) == frozenset()
    namespace["tl"] = tl
    assert interpreter_patch_once._language_modules(helper, languages) == {id(tl)}


def test_install_is_idempotent():
    patch, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    interpreter_patch_once.install()
    assert interpreter._patch_lang is patch
    assert interpreter.GridExecutor.__call__ is launch


@triton.jit
def _times_kernel(X, factor, SIZE: tl.constexpr):
    offsets = tl.arange(0, SIZE)
    tl.store(X + offsets, tl.load(X + offsets) * factor)


def test_overflow_checks_are_off_and_would_check_nothing(monkeypatch):
    """The option is off here; and with it on, as the interpreter has it by default, an
    int32 product that overflows still wraps without a word (the check's verdict goes to
    ``device_assert``, which drops it without ``debug=True``). Should a Triton make the
    check raise, this fails, and the option is worth its time again."""
    builder = interpreter.interpreter_builder
    assert builder.options.sanitize_overflow is False
    monkeypatch.setattr(builder, "options",
                        dataclasses.replace(builder.options, sanitize_overflow=True))
    x = torch.tensor([2**30, 3] * (SIZE // 2), dtype=torch.int32)
    _times_kernel[(1,)](x, 4, SIZE=SIZE)
    assert x[:2].tolist() == [0, 12]  # 2**32 wrapped to 0


def test_turning_overflow_checks_off_is_idempotent():
    interpreter_setup.without_overflow_checks()
    assert interpreter.interpreter_builder.options.sanitize_overflow is False


def _interpreter_set_up(rank, world_size):
    return (getattr(interpreter.InterpreterBuilder.create_dot,
                    interpreter_like_gpu._INSTALLED_MARK, False),
            getattr(interpreter._patch_lang, interpreter_patch_once._INSTALLED_MARK, False),
            interpreter.interpreter_builder.options.sanitize_overflow)


def test_spawned_ranks_run_the_interpreter_as_this_process_does():
    assert _interpreter_set_up(0, 1) == (True, True, False)
    assert run_on_ranks(1, _interpreter_set_up) == [(True, True, False)]
