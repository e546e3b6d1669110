"""``blipfast-demo`` (the README's main job): runs, checks its results, refuses bad
arguments."""

import subprocess
import sys

import pytest
import torch

import blipfast
from blipfast import demo
from blipfast.kernels._runtime import interpreter_enabled


def test_demo_runs_and_reports_errors_within_tolerance(capsys):
    demo.main(["--batch", "1", "--repeats", "1"])
    output = capsys.readouterr().out
    assert "max error vs float64 reference" in output and "time per call" in output
    # the suite runs the kernels on the Triton interpreter on CPU (tests/conftest.py)
    path = ("Triton interpreter" if interpreter_enabled() else
            "Triton kernel on GPU" if torch.cuda.is_available() else "PyTorch reference fallback")
    assert f"attention path: {path}\n" in output
    assert f"time per call: blipfast.ops.attention ({path})" in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback runs on CPU only")
def test_demo_says_when_it_ran_the_reference_fallback_not_a_kernel(reference_path, capsys):
    """On CPU without TRITON_INTERPRET, blipfast.ops.attention is the PyTorch reference:
    the demo says so, and does not call the timing or the check a kernel's."""
    demo.main(["--batch", "1", "--repeats", "1"])
    output = capsys.readouterr().out
    assert "attention path: PyTorch reference fallback" in output
    assert "no Triton kernel runs" in output and "not a kernel" in output
    assert "time per call: blipfast.ops.attention (PyTorch reference fallback)" in output
    assert "Triton interpreter\n" not in output and "time per call: blipfast " not in output


def test_demo_exits_130_with_one_line_on_ctrl_c(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(blipfast.ops, "attention", interrupted)
    with pytest.raises(SystemExit) as raised:
        demo.main(["--batch", "1", "--repeats", "1"])
    assert raised.value.code == 130
    assert capsys.readouterr().err == "blipfast-demo: interrupted\n"


def test_demo_help_names_the_console_script(capsys):
    with pytest.raises(SystemExit) as raised:
        demo.main(["--help"])
    assert raised.value.code == 0
    assert capsys.readouterr().out.startswith("usage: blipfast-demo ")
    # also as python -m blipfast.demo, where argparse would name demo.py
    result = subprocess.run([sys.executable, "-m", "blipfast.demo", "--help"],
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.startswith("usage: blipfast-demo ") and "demo.py" not in result.stdout


def test_demo_fails_when_the_attention_is_wrong(reference_path, monkeypatch):
    attention = blipfast.ops.attention
    monkeypatch.setattr(blipfast.ops, "attention",
                        lambda *args, **kwargs: attention(*args, **kwargs) * 1.01)
    with pytest.raises(SystemExit, match="off by"):
        demo.main(["--batch", "1", "--repeats", "1"])
    monkeypatch.setattr(blipfast.ops, "attention",
                        lambda *args, **kwargs: torch.full_like(args[0], float("nan")))
    with pytest.raises(SystemExit, match="off by nan"):
        demo.main(["--batch", "1", "--repeats", "1"])


@pytest.mark.parametrize("arguments", [["--batch", "0"], ["--repeats", "-1"], ["--batch", "x"],
                                       ["--batch", "abc"], ["--repeats", "1.5"]])
def test_demo_refuses_bad_arguments(arguments, capsys):
    with pytest.raises(SystemExit) as raised:
        demo.main(arguments)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {arguments[0]}: must be a positive integer, got {arguments[1]!r}" in error
    assert "_positive_int" not in error and "invalid" not in error
