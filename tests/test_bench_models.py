"""bench/run_models.py on CPU (``--cpu-smoke``, the tiny config): every step and variant
runs, profiles, and writes its result files, and every implementation of a step gives
the eager model's loss, so the GPU run does not spend device time finding a broken
harness."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run_models  # noqa: E402  (a bench script, importable once bench/ is on the path)


def test_model_steps_run_on_the_tiny_config(tmp_path, monkeypatch):
    # The PyTorch references stand in for the kernels (the interpreter would take minutes;
    # the kernels have their own tests): this checks the harness and the models around them.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert run_models.main(["--cpu-smoke", "--recompute-projections", "--profile",
                            "--out", str(tmp_path)]) == 0
    [results] = tmp_path.glob("models-cpu-smoke-*.jsonl")
    [report] = tmp_path.glob("models-cpu-smoke-*.md")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert {record["step"] for record in records} == set(run_models.STEPS)
    for step in run_models.STEPS:
        losses = {record["implementation"]: record["loss"] for record in records
                  if record["step"] == step}
        assert len(losses) >= 2 and "transformers eager" in losses, step
        eager = losses["transformers eager"]
        for implementation, loss in losses.items():
            assert abs(loss - eager) <= 1e-4 * abs(eager), (step, implementation, loss, eager)
        assert f"by kernel category (ms), {step}" in report.read_text()
