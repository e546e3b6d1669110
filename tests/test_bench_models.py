"""bench/run_models.py on CPU (``--cpu-smoke``, the tiny config): every step and variant
runs, profiles, and writes its result files, and every implementation of a step gives
the eager model's loss, so the GPU run does not spend device time finding a broken
harness."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run_models  # noqa: E402  (a bench script, importable once bench/ is on the path)


def test_model_steps_run_on_the_tiny_config(tmp_path, reference_path):
    # The PyTorch references stand in for the kernels (the interpreter would take minutes;
    # the kernels have their own tests): this checks the harness and the models around them.
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
            # The same weights, pairs and updates: fp32 summation order is all that differs
            # (the pre-training reference replays the ITM negatives blipfast drew).
            assert abs(loss - eager) <= 1e-5 * abs(eager), (step, implementation, loss, eager)
        assert f"by kernel category (ms), {step}" in report.read_text()


def test_pretraining_reference_scores_the_negatives_blipfast_drew(reference_path, monkeypatch):
    """The reference is given, step by step, the ITM negatives blipfast's step drew (other
    pairs would move the ITM loss by more than the implementations differ), and the FLOP
    count runs on a copy, so it does not advance the reference's queue."""
    config = run_models._config(True)
    inputs = run_models._inputs("pretraining", config, 4, 9, "cpu")
    variants = run_models._pretraining_models(config, "cpu", compile_peer=False)
    assert list(variants)[0] == "blipfast BlipForPreTraining"  # runs first: it draws
    ours, reference = variants["blipfast BlipForPreTraining"], variants["transformers eager"]
    pointer = reference.queue_ptr.clone()
    run_models._count_flops("pretraining", reference, inputs, "cpu", torch.float32)
    assert torch.equal(reference.queue_ptr, pointer)

    negatives = run_models.DrawnNegatives()
    given = []
    original_forward = reference.forward

    def spy(*arguments):
        given.append((arguments[4].clone(), arguments[5].clone()))
        return original_forward(*arguments)

    monkeypatch.setattr(reference, "forward", spy)
    for model in (ours, reference, ours, reference):
        model.train()
        run_models._loss("pretraining", model, inputs, negatives)
    assert len(negatives.drawn) == 2 and len(given) == 2
    for (text, image), (given_text, given_image) in zip(negatives.drawn, given):
        assert torch.equal(text, given_text) and torch.equal(image, given_image)
    # beyond the recorded steps: the inputs' fixed negatives
    run_models._loss("pretraining", reference, inputs, negatives)
    assert torch.equal(given[-1][0], inputs["negative_text_index"])
