"""bench/activation_census.py: the census runs end to end on the tiny config, blipfast's
implementations run through the Triton stand-ins (their eager autograd.Functions), the
stand-ins compute what the kernels compute, and leaving them restores every replaced name."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from blipfast import ops, reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import activation_census  # noqa: E402  (a bench script, importable once bench/ is on the path)

IMPLEMENTATIONS = ("transformers eager", "transformers + blipfast.patch", "blipfast model")
BLIPFAST_FUNCTIONS = ("AttentionFunctionBackward", "LayerNormFunctionBackward")


def _replaced_names() -> list:
    """Every (namespace, name) the stand-ins replace (found before they are installed)."""
    names = [(module, "use_triton") for module in activation_census.modules_holding_use_triton()]
    names += [(importlib.import_module(module_name), launcher)
              for module_name, launcher in activation_census.LAUNCHER_STAND_INS]
    return names + [(importlib.import_module("blipfast.ops.recompute"), "CHAIN_TO_OUTER_HOOKS")]


def _held_objects(names: list) -> dict:
    """{(module name, name): the object the namespace holds under that name now}."""
    return {(namespace.__name__, name): getattr(namespace, name) for namespace, name in names}


def test_census_of_captioning_on_the_small_config(tmp_path):
    names = _replaced_names()
    originals = _held_objects(names)
    out = tmp_path / "census.json"
    assert activation_census.main(["--small", "--batch", "2", "--steps", "captioning",
                                   "--out", str(out)]) == 0

    census = json.loads(out.read_text())["steps"]["captioning"]
    assert tuple(census) == IMPLEMENTATIONS
    for name, entry in census.items():
        assert entry["activation_bytes"] > 0, name
        assert entry["weight_cast_bytes"] > 0, name  # bf16 autocast copies of the weights
        assert entry["trained_parameter_count"] > 0, name
    assert census["transformers eager"]["stand_in_calls"] == {}
    for name in IMPLEMENTATIONS[1:]:
        calls = census[name]["stand_in_calls"]
        for launcher in ("attention_forward", "layer_norm_forward", "bias_gelu_forward",
                         "cross_entropy_forward"):
            assert calls.get(launcher, 0) > 0, (name, launcher)
        saved_by = {group["saved_by"] for group in census[name]["groups"]}
        # the eager autograd.Functions, not the custom ops
        assert set(BLIPFAST_FUNCTIONS) <= saved_by, (name, saved_by)
        assert any(node.startswith("BiasGelu") for node in saved_by), (name, saved_by)
    restored = _held_objects(names)
    assert all(restored[key] is original for key, original in originals.items())


def test_leaving_the_stand_ins_restores_every_name_even_after_an_error():
    names = _replaced_names()
    assert len(names) >= 6 + len(activation_census.LAUNCHER_STAND_INS)  # _dispatch + 5 ops
    originals = _held_objects(names)
    with pytest.raises(RuntimeError, match="inside"):
        with activation_census.triton_stand_ins():
            replaced = _held_objects(names)
            assert all(replaced[key] is not original for key, original in originals.items())
            raise RuntimeError("inside")
    restored = _held_objects(names)
    assert all(restored[key] is original for key, original in originals.items())


def test_stand_ins_compute_what_the_kernels_compute():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 16, generator=generator) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x, residual = (torch.randn(3, 4, 32, generator=generator) for _ in range(2))
    weight, bias = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1)
                   for _ in range(2))
    image_momentum, text_momentum, image_queue, text_queue = (
        torch.nn.functional.normalize(torch.randn(rows, 16, generator=generator), dim=-1)
        for rows in (6, 6, 10, 10))
    scale = torch.tensor(1 / 0.07)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])

    with activation_census.triton_stand_ins() as calls:
        attention = ops.attention(q, k, v, causal=True, key_padding_mask=mask)
        normed, total = ops.add_layer_norm(x, residual, weight, bias)
        gelu = ops.bias_gelu(x, bias)
        sampled = ops.contrastive_loss_with_hard_negatives(image, text, scale, image_ids=ids,
                                                           label_smoothing=0.1)
        queued = ops.contrastive_loss_with_queue(
            image, text, scale, image_feat_momentum=image_momentum,
            text_feat_momentum=text_momentum, image_queue=image_queue, text_queue=text_queue)
    assert set(calls) == {"attention_forward", "layer_norm_forward", "bias_gelu_forward",
                          "contrastive_forward"}

    torch.testing.assert_close(attention, reference.attention(q, k, v, causal=True,
                                                              key_padding_mask=mask))
    expected_normed, expected_total = reference.add_layer_norm(x, residual, weight, bias)
    torch.testing.assert_close(normed, expected_normed)
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(gelu, reference.bias_gelu(x, bias))
    torch.testing.assert_close(sampled.loss, reference.contrastive_loss(
        image, text, scale, image_ids=ids, label_smoothing=0.1))
    for negatives in (sampled.negative_text_index, sampled.negative_image_index):
        assert ((negatives >= 0) & (negatives < 6)).all()
        assert (ids[negatives] != ids).all()  # never a positive
    torch.testing.assert_close(queued, reference.contrastive_loss_with_queue(
        image, text, scale, image_feat_momentum=image_momentum,
        text_feat_momentum=text_momentum, image_queue=image_queue, text_queue=text_queue))


def test_an_interrupted_census_keeps_the_files_earlier_entries(tmp_path, monkeypatch):
    """Ctrl-C after the first implementation: the file keeps its earlier entries (same
    settings) beside the one just measured, which records its versions, and the run exits
    130. (It used to replace the whole file with the partial run's entries.)"""
    out = tmp_path / "census.json"
    settings = dict(batch=2, scaled_to_batch=64, length=35, dtype="bfloat16",
                    autocast_policy="cuda", small=True)
    earlier = {"itc": {"transformers eager": {"activation_bytes": 1}},
               "captioning": {"blipfast model": {"activation_bytes": 2}}}
    out.write_text(json.dumps(dict(settings, header="earlier run", steps=earlier)))
    take_census, calls = activation_census.take_census, []

    def interrupted_at_the_second_implementation(*arguments, **options):
        calls.append(1)
        if len(calls) > 2:  # two censuses (two batches) per implementation
            raise KeyboardInterrupt
        return take_census(*arguments, **options)

    monkeypatch.setattr(activation_census, "take_census",
                        interrupted_at_the_second_implementation)
    assert activation_census.main(["--small", "--steps", "captioning", "--out", str(out)]) == 130
    steps = json.loads(out.read_text())["steps"]
    label = "the run whose header was: earlier run"  # kept entries say where they are from
    assert steps["itc"] == {"transformers eager": {"activation_bytes": 1, "measured_with": label}}
    assert steps["captioning"]["blipfast model"] == {"activation_bytes": 2, "measured_with": label}
    measured_with = steps["captioning"]["transformers eager"]["measured_with"]
    assert "torch " in measured_with and "blipfast " in measured_with

    # a file of other settings is replaced
    out.write_text(json.dumps(dict(settings, batch=3, header="other", steps=earlier)))
    calls.clear()
    assert activation_census.main(["--small", "--steps", "captioning", "--out", str(out)]) == 130
    assert list(json.loads(out.read_text())["steps"]) == ["captioning"]


@pytest.mark.parametrize("arguments", [["--batch", "0"], ["--scale-to", "-5"], ["--length", "1"],
                                       ["--top", "-1"]])
def test_census_numbers_are_checked(arguments, capsys):
    with pytest.raises(SystemExit):
        activation_census.parse_arguments(arguments)
    assert arguments[0] in capsys.readouterr().err
