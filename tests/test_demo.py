"""``blipfast-demo`` (the README's main job): runs, checks its results, refuses bad
arguments."""

import pytest
import torch

import blipfast
from blipfast import demo


def test_demo_runs_and_reports_errors_within_tolerance(capsys):
    demo.main(["--batch", "1", "--repeats", "1"])
    output = capsys.readouterr().out
    assert "max error vs float64 reference" in output and "time per call" in output


def test_demo_fails_when_the_attention_is_wrong(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference path on CPU: faster
    attention = blipfast.ops.attention
    monkeypatch.setattr(blipfast.ops, "attention",
                        lambda *args, **kwargs: attention(*args, **kwargs) * 1.01)
    with pytest.raises(SystemExit, match="off by"):
        demo.main(["--batch", "1", "--repeats", "1"])
    monkeypatch.setattr(blipfast.ops, "attention",
                        lambda *args, **kwargs: torch.full_like(args[0], float("nan")))
    with pytest.raises(SystemExit, match="off by nan"):
        demo.main(["--batch", "1", "--repeats", "1"])


@pytest.mark.parametrize("arguments", [["--batch", "0"], ["--repeats", "-1"], ["--batch", "x"]])
def test_demo_refuses_bad_arguments(arguments, capsys):
    with pytest.raises(SystemExit) as raised:
        demo.main(arguments)
    assert raised.value.code == 2
    assert arguments[0] in capsys.readouterr().err
