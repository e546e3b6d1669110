"""The bench scripts' command lines: bad arguments are rejected with a clear message
(argparse's status 2, no traceback), a GPU run without a GPU exits 1 with a message, the
--help descriptions are whole sentences, and smoke runs do not overwrite committed
results (CPU; no timing)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
BENCH = REPOSITORY / "bench"
sys.path.insert(0, str(BENCH))

import activation_census  # noqa: E402
import run_models  # noqa: E402
import sweep_attention_configs as sweep  # noqa: E402


def _rejected(parse, arguments, capsys) -> str:
    """The error message of an argparse rejection of ``arguments``."""
    with pytest.raises(SystemExit) as exit_info:
        parse(arguments)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--part", "abc"], "argument --part: expected I/N (e.g. 3/12), got 'abc'"),
    (["--compile-only", "--part", "3/2"], "expected I/N with 1 <= I <= N, got '3/2'"),
    (["--compile-only", "--part", "0/2"], "expected I/N with 1 <= I <= N, got '0/2'"),
    (["--part", "1/2"], "argument --part: only with --compile-only"),
    (["--shapes", "bogus"], "argument --shapes: unknown shape bogus; valid shapes: "
                            "text_bidir_pad, text_causal_pad"),
    (["--shapes", "vit_g_self,nope,other"], "unknown shapes nope, other; valid shapes:"),
])
def test_sweep_rejects_bad_arguments(arguments, message, capsys):
    assert message in _rejected(sweep.parse_arguments, arguments, capsys)


def test_sweep_arguments_and_description(capsys):
    options = sweep.parse_arguments(["--compile-only", "--part", "12/12",
                                     "--shapes", "vit_g_self,decode_self_cache"])
    assert options.part == (12, 12) and options.shapes == ["vit_g_self", "decode_self_cache"]
    with pytest.raises(SystemExit):
        sweep.parse_arguments(["--help"])
    assert "Sweep tile configurations of the attention kernels" in capsys.readouterr().out


def test_sweep_without_a_gpu_exits_1_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.main(["--shapes", "vit_g_self"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--cpu-smoke", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--iterations", "-2"], "argument --iterations: must be at least 1, got -2"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["--batch", "two"], "argument --batch: not an integer: 'two'"),
    (["--cpu-smoke", "--length", "41"], "argument --length: at most 40"),
])
def test_run_models_rejects_bad_arguments(arguments, message, capsys):
    assert message in _rejected(run_models.parse_arguments, arguments, capsys)


def test_run_models_defaults_depend_on_the_smoke_run():
    gpu = run_models.parse_arguments([])
    assert (gpu.batch, gpu.length, gpu.iterations, gpu.warmup) == (64, 35, 10, 3)
    smoke = run_models.parse_arguments(["--cpu-smoke"])
    assert (smoke.batch, smoke.length, smoke.iterations, smoke.warmup) == (4, 9, 2, 1)
    given = run_models.parse_arguments(["--cpu-smoke", "--batch", "2", "--warmup", "0"])
    assert (given.batch, given.warmup) == (2, 0)


def test_run_models_without_a_gpu_exits_1_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_models.main(["--steps", "itc"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def _description(script: str) -> str:
    """The description paragraph of ``script --help``."""
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split("\n\n")[1].split())


@pytest.mark.parametrize("script, ending", [
    ("precompile_for_gpu.py", "that the GPU machine then reads instead of compiling."),
    ("run_models.py", "same weights, side by side."),
])
def test_help_descriptions_are_whole_sentences(script, ending):
    assert _description(script).endswith(ending)


def test_host_overhead_rejects_non_positive_counts():
    result = subprocess.run([sys.executable, str(BENCH / "host_overhead.py"), "--calls", "0",
                             "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --calls: must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_register_report_shows_the_ptxas_error(tmp_path):
    """In a process of its own (register_report compiles for the GPU, not the
    interpreter), with a ptxas that fails as Triton 3.9's does on this PTX."""
    ptxas = tmp_path / "ptxas"
    ptxas.write_text("#!/bin/sh\necho 'ptxas fatal   : Unsupported .version 9.4' >&2\nexit 255\n")
    ptxas.chmod(0o755)
    script = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import register_report; "
              f"register_report._ptxas = lambda: {str(ptxas)!r}; "
              "sys.exit(register_report.main(['--op', 'bias_gelu']))")
    environment = dict(os.environ)
    environment.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=environment, cwd=REPOSITORY)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: ptxas failed on a bias_gelu kernel" in result.stderr
    assert "exited with status 255:\nptxas fatal   : Unsupported .version 9.4" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("arguments, writes_the_committed_census", [
    ([], True),
    (["--recompute-projections", "--top", "5"], True),
    (["--steps", "pretraining", "itc", "itm", "captioning"], True),
    (["--small"], False),
    (["--steps", "itc"], False),
    (["--batch", "1"], False),
    (["--dtype", "float32"], False),
])
def test_only_the_default_full_census_writes_the_committed_file(arguments,
                                                                writes_the_committed_census):
    options = activation_census.parse_arguments(arguments)
    expected = activation_census.DEFAULT_OUT if writes_the_committed_census else None
    assert options.out == expected
    chosen = activation_census.parse_arguments([*arguments, "--out", "census.json"])
    assert chosen.out == Path("census.json")


def test_a_results_directory_that_cannot_be_written_is_refused_before_measuring(tmp_path,
                                                                              capsys):
    """--out of run_models (and run_attention, run_contrastive: the same type) is checked
    when the command line is read: a file, or a place where nothing can be written, stops
    the command at once instead of after its first measurement."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    message = _rejected(run_models.parse_arguments, ["--cpu-smoke", "--out", str(a_file)], capsys)
    assert f"argument --out: {a_file} exists and is not a directory" in message
    message = _rejected(run_models.parse_arguments,
                        ["--cpu-smoke", "--out", str(a_file / "below")], capsys)
    assert "argument --out: cannot write results in" in message
    made = tmp_path / "new" / "results"
    assert run_models.parse_arguments(["--cpu-smoke", "--out", str(made)]).out == made
    assert made.is_dir() and not any(made.iterdir())  # the probe file is gone


def test_gpu_session_stages_end_within_the_limit_and_report_failures(tmp_path):
    """bench/gpu_session.sh, with python and timeout stood in for: an unknown stage exits 2
    before installing anything; every step's time limit (plus the SIGKILL margin) ends
    within LIMIT of the call's start; a failed step makes the call exit 1."""
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    calls = tmp_path / "calls.txt"
    (stand_ins / "python").write_text(
        f'#!/bin/bash\necho "python $*" >> {calls}\n'
        'case "$*" in *run_contrastive*) exit 3;; esac\nexit 0\n')
    (stand_ins / "timeout").write_text(
        f'#!/bin/bash\nshift 2\necho "timeout $1" >> {calls}\nshift\nexec "$@"\n')
    for stand_in in stand_ins.iterdir():
        stand_in.chmod(0o755)
    environment = dict(os.environ, PATH=f"{stand_ins}:{os.environ['PATH']}", LIMIT="300",
                       OUT=str(tmp_path / "out"))
    script = str(BENCH / "gpu_session.sh")

    def run(stage):
        calls.write_text("")
        result = subprocess.run(["bash", script, stage], env=environment, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        return result, calls.read_text().splitlines()

    result, made = run("bogus")
    assert result.returncode == 2 and "unknown stage bogus" in result.stdout and made == []
    for stage, status in (("kernels", 1), ("sweep", 0), ("models", 0)):
        result, made = run(stage)
        assert result.returncode == status, (stage, result.stdout, result.stderr)
        limits = [int(line.split()[1]) for line in made if line.startswith("timeout ")]
        assert limits and all(limit + 20 <= 300 for limit in limits), (stage, limits)
    result, _ = run("kernels")
    assert "contrastive exit 3" in result.stdout and "attention exit 0" in result.stdout
    # a limit the install itself uses up: nothing runs past it, and the call fails
    environment["LIMIT"] = "21"
    result, made = run("kernels")
    limits = [int(line.split()[1]) for line in made if line.startswith("timeout ")]
    assert result.returncode == 1 and all(limit + 20 <= 21 for limit in limits), limits


@pytest.mark.parametrize("arguments, message", [
    (["--unpack", "{missing}", "--into", "{tmp}/cache"], "argument --unpack: no archive at"),
    (["--unpack", "{not_xz}", "--into", "{tmp}/cache"], "not a readable .tar.xz archive"),
    (["--check", "{missing}"], "argument --check: no archive at"),
    (["--check", "{not_xz}"], "argument --check:"),
    (["--into", "{tmp}/cache"], "argument --into: only with --unpack"),
])
def test_precompile_archive_arguments_are_checked(arguments, message, tmp_path):
    """A missing or unreadable archive is an argument error (it was a traceback, after
    making the cache directory), and --check fails on the archive, not on an unrelated
    --libtriton-sha256 demand."""
    not_xz = tmp_path / "archive.tar.xz"
    not_xz.write_text("not xz")
    arguments = [argument.format(missing=tmp_path / "missing.tar.xz", not_xz=not_xz,
                                 tmp=tmp_path) for argument in arguments]
    result = subprocess.run([sys.executable, str(BENCH / "precompile_for_gpu.py"), *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-800:]
    assert not (tmp_path / "cache").exists()


def test_seeds_are_checked_when_the_command_line_is_read():
    """A seed torch.manual_seed cannot take was an OverflowError traceback mid-run."""
    import argparse

    import command_line

    assert command_line.seed("0") == 0 and command_line.seed(str(2**64 - 1)) == 2**64 - 1
    for bad in (str(2**64), "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            command_line.seed(bad)
