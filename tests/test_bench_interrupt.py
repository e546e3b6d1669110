"""Ctrl-C (SIGINT) in the benchmark scripts: they stop measuring, print the summary of
what finished, write it, and exit with status 130 without a traceback (as
bench/gpu_session.sh expects of the stages it stops with SIGINT). CPU; no timing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "bench"))

import attention_benchmark_cases as attention  # noqa: E402
import result_files  # noqa: E402
import run_attention  # noqa: E402
import run_models  # noqa: E402
import sweep_attention_configs as sweep  # noqa: E402

ENVIRONMENT = dict(device="Test GPU", torch="-", triton="-", cuda="-", date="2026-01-02")


def test_sigint_of_a_cpu_smoke_run_writes_and_prints_what_finished(tmp_path):
    """A real SIGINT, sent once the first measurement is written: the interpreter runs
    blipfast's kernels for seconds after it, so the signal arrives mid-measurement."""
    command = [sys.executable, str(REPOSITORY / "bench" / "run_contrastive.py"), "--cpu-smoke",
               "--implementations", "materialized", "blipfast", "--out", str(tmp_path)]
    environment = dict(os.environ, TRITON_INTERPRET="1")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith("smoke_n64") and "materialized" in line:
                break
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the line is printed just before the result is written
        assert list(tmp_path.glob("*.jsonl")), "".join(output)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(output) + rest
    assert process.returncode == result_files.INTERRUPTED_EXIT_STATUS, text
    assert "Traceback" not in text
    assert "Interrupted (Ctrl-C)" in text and "(interrupted: partial)" in text
    assert "Results written to" in text
    assert "| smoke_n64 (N=64 Q=1 D=256 float32) | materialized |" in text  # the table
    [jsonl_path] = tmp_path.glob("*.jsonl")
    measurements = result_files.read_result_file(jsonl_path).measurements
    assert [row["implementation"] for row in measurements][:1] == ["materialized"]


def test_run_attention_stops_on_ctrl_c_with_the_table(tmp_path, monkeypatch, capsys):
    calls = []

    def measure(implementation_name, case, mode, *, seed):
        calls.append(implementation_name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return attention.MeasurementRecord.create(implementation_name, case, mode, "ok",
                                                  milliseconds=1.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "collect_environment", lambda: ENVIRONMENT)
    monkeypatch.setattr(attention, "measure", measure)
    status = run_attention.main(["--out", str(tmp_path), "--case", "vit_g_self",
                                 "--implementation", "blipfast", "sdpa_math"])
    output = capsys.readouterr()
    assert status == 130
    assert "Attention benchmark (interrupted: partial)" in output.out
    assert "| vit_g_self (" in output.out and "Results written to" in output.out
    assert "Interrupted (Ctrl-C)" in output.err
    [jsonl_path] = tmp_path.glob("*.jsonl")
    assert len(result_files.read_result_file(jsonl_path).measurements) == 1


def test_run_models_stops_on_ctrl_c_with_the_table(tmp_path, reference_path, monkeypatch, capsys):
    timed = []

    def time_step(step, model, inputs, device, dtype, warmup, iterations, **keywords):
        timed.append((inputs["input_ids"].shape, warmup, iterations))
        if len(timed) == 2:
            raise KeyboardInterrupt
        return dict(ms=10.0, peak_gib=float("nan"), loss=1.5, warmup_seconds=0.0)

    monkeypatch.setattr(run_models, "_time_step", time_step)
    # Stand-ins for the models (the harness around them is what is tested here; the real
    # models run in tests/test_bench_models.py).
    monkeypatch.setattr(run_models, "_models", lambda *arguments: {
        run_models.EAGER: torch.nn.Linear(1, 1), "blipfast model": torch.nn.Linear(1, 1)})
    monkeypatch.setattr(run_models, "_count_flops", lambda *arguments: 1e9)
    status = run_models.main(["--cpu-smoke", "--steps", "itc", "--batch", "3", "--length", "7",
                              "--iterations", "1", "--warmup", "0", "--out", str(tmp_path)])
    output = capsys.readouterr()
    assert status == 130
    # --batch, --length, --warmup and --iterations are honoured by the smoke run
    assert timed[0] == (torch.Size([3, 7]), 0, 1)
    assert "Interrupted: partial results" in output.out and "Results written to" in output.out
    assert "| itc | 3 x 7 | transformers eager | 10.0 |" in output.out
    [jsonl_path] = tmp_path.glob("models-cpu-smoke-*.jsonl")
    [row] = result_files.read_result_file(jsonl_path).measurements
    assert (row["step"], row["batch"], row["length"]) == ("itc", 3, 7)


class _Shape:
    def __init__(self, name: str):
        self.name = name


def _candidates(shape):
    for index in range(3):
        yield sweep.Candidate("fwd", "fwd", dict(BLOCK_M=16 * (index + 1)), lambda: None)


def test_the_sweep_prints_partial_best_lines_on_ctrl_c(tmp_path, capsys):
    timings = iter([3.0, 1.0, 2.0, 5.0, 4.0])  # then Ctrl-C, during the second shape

    def milliseconds(run):
        try:
            return next(timings)
        except StopIteration:
            raise KeyboardInterrupt from None

    out = tmp_path / "sweep.jsonl"
    status = sweep.run_sweep([_Shape("first"), _Shape("second"), _Shape("third")],
                             _candidates, milliseconds, out)
    lines = capsys.readouterr().out.splitlines()
    assert status == 130
    best = [line for line in lines if " best " in line]
    assert best[0].startswith("first") and "best 1.0000 ms {'BLOCK_M': 32}" in best[0]
    assert best[0].endswith("}")
    assert best[1].startswith("second") and "best 4.0000 ms {'BLOCK_M': 32}" in best[1]
    assert best[1].endswith("(partial: interrupted after 2 candidates)")
    assert len(best) == 2  # the third shape measured nothing
    assert f"Results written to {out} (5 candidates)" in lines
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["record_type"] == "environment" and "torch" in rows[0] and "device" in rows[0]
    assert len(rows) == 6
    # a later sweep of one shape merges into the file: the other shapes' lines are kept
    timings = iter([9.0, 9.0, 9.0])
    assert sweep.run_sweep([_Shape("first")], _candidates, lambda run: next(timings), out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()][1:]
    assert len(rows) == 5 and sorted(row["ms"] for row in rows) == [4.0, 5.0, 9.0, 9.0, 9.0]


def test_the_sweep_compile_only_part_runs_its_share(capsys):
    ran = []

    def candidates(shape):
        for index in range(6):
            yield sweep.Candidate("fwd", "fwd", dict(index=index),
                                  lambda index=index: ran.append(index))

    assert sweep.run_sweep([_Shape("shape")], candidates, None, compile_only=True,
                           part=(2, 3)) == 0
    assert ran == [1, 4]  # every third candidate from the second
    assert "part 2/3: ran 2 candidates" in capsys.readouterr().out
