"""``blipfast.patch`` on transformers' BLIP models: same class, state dict and API; outputs,
gradients and generated tokens match the unpatched model; ``unpatch`` restores it."""

import copy
import functools
import inspect
import io

import pytest
import torch

import blipfast
from blipfast.models.blip.text import CACHE_NAME
from blip_models import TASKS, hf_model, images, text_batch, tiny_config

TOLERANCE = 1e-4


def _inputs(task, generator):
    pixels = images(3, generator)
    ids, mask = text_batch(3, 8, generator, pad_last_from=5)
    if task == "BlipForConditionalGeneration":
        return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                    labels=ids.masked_fill(mask == 0, -100))
    if task == "BlipForImageTextRetrieval":
        return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask)
    ids, mask = text_batch(3, 8, generator)  # unpadded: see blipfast.patching's docstring
    answers, _ = text_batch(3, 4, generator)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=answers)


def _assert_gradients_match(expected_model, actual_model, tolerance=TOLERANCE):
    """Every gradient of ``expected_model`` within ``tolerance`` (relative to its largest
    element) in ``actual_model``."""
    actual_parameters = dict(actual_model.named_parameters())
    compared = 0
    for name, parameter in expected_model.named_parameters():
        if parameter.grad is None:
            continue
        got = actual_parameters[name].grad
        scale = parameter.grad.abs().max().item() + 1e-12
        assert (got - parameter.grad).abs().max().item() <= tolerance * (scale + 1e-2), name
        compared += 1
    assert compared, "no gradient to compare: the expected model holds none"


def _assert_patched_and_own_captioning_match(original, inputs, forward=None,
                                             tolerance=TOLERANCE):
    """A patched copy of the transformers captioning model ``original`` and blipfast's own
    model converted from it give its logits and gradients on ``inputs`` within
    ``tolerance``; ``forward(model)`` runs each (default ``model(**inputs)``). Returns
    ``original``'s output."""
    import blipfast.models as models

    expected = original(**inputs)
    original.zero_grad(set_to_none=True)
    expected.loss.backward()
    for model in (blipfast.patch(copy.deepcopy(original)),
                  models.BlipForConditionalGeneration.from_hf(original)):
        model.zero_grad(set_to_none=True)
        actual = forward(model) if forward is not None else model(**inputs)
        error = (actual.logits - expected.logits).abs().max().item()
        assert error < tolerance, type(model).__module__
        actual.loss.backward()
        _assert_gradients_match(original, model, tolerance)
    return expected


def _scalar_of(output):
    return output.loss if getattr(output, "loss", None) is not None else output.itm_score.sum()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the fused ops, so a patch that silently does nothing fails."""
    calls = {}
    for name in ("attention", "layer_norm", "add_layer_norm", "bias_gelu", "bias_gelu_linear",
                 "cross_entropy"):
        original = getattr(blipfast.ops, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(blipfast.ops, name, counting)
    return calls


@pytest.mark.parametrize("task", TASKS)
def test_patched_model_matches_unpatched(task, kernel_calls):
    original = hf_model(task, tiny_config(), seed=20)
    original.train()
    patched = blipfast.patch(copy.deepcopy(original))
    assert type(patched) is type(original)
    assert blipfast.is_patched(patched) and not blipfast.is_patched(original)
    assert patched.state_dict().keys() == original.state_dict().keys()
    inputs = _inputs(task, torch.Generator().manual_seed(20))
    expected = original(**inputs)
    assert not kernel_calls
    actual = patched(**inputs)
    # 2 vision layers + 2 text layers (self- and cross-attention) per text model.
    text_models = 2 if task == "BlipForQuestionAnswering" else 1
    assert kernel_calls["attention"] == 2 + 4 * text_models
    assert kernel_calls["add_layer_norm"] == 3  # vision: each layer's LN2 and layer 2's LN1
    assert kernel_calls["bias_gelu_linear"] == 2 + 2 * text_models  # every FFN
    # the LM heads' transform (captioning's decoder, VQA's answer decoder)
    assert kernel_calls.get("bias_gelu", 0) == (0 if task == "BlipForImageTextRetrieval" else 1)
    if task != "BlipForImageTextRetrieval":
        assert kernel_calls["cross_entropy"] == 1
    for field in ("loss", "logits", "itm_score", "image_embeds", "question_embeds"):
        if getattr(expected, field, None) is not None:
            error = (getattr(actual, field) - getattr(expected, field)).abs().max().item()
            assert error < TOLERANCE, (field, error)
    _scalar_of(expected).backward()
    _scalar_of(actual).backward()
    patched_parameters = dict(patched.named_parameters())
    for name, parameter in original.named_parameters():
        if parameter.grad is None:
            continue
        error = (patched_parameters[name].grad - parameter.grad).abs().max().item()
        assert error <= TOLERANCE * max(parameter.grad.abs().max().item(), 1e-3), name


def test_patched_captions_match_and_unpatch_restores():
    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=21)
    model = copy.deepcopy(original)
    pixels = images(2, torch.Generator().manual_seed(21))
    expected = original.generate(pixel_values=pixels, max_length=6)
    assert blipfast.patch(model) is model
    blipfast.patch(model)  # twice: no-op
    assert torch.equal(model.generate(pixel_values=pixels, max_length=6), expected)
    blipfast.unpatch(model)
    assert not blipfast.is_patched(model)
    for module in model.modules():
        assert not {"forward", "_expand_inputs_for_generation", "_reorder_cache"} & set(module.__dict__)
        assert not any(name.startswith("_blipfast") for name in module.__dict__)
    assert "activation" not in model.text_decoder.bert.encoder.layer[0].intermediate.__dict__
    with pytest.raises(ValueError, match="output_attentions"):
        blipfast.patch(model).vision_model(pixel_values=pixels, output_attentions=True)
    blipfast.unpatch(model)
    assert model.vision_model(pixel_values=pixels, output_attentions=True).attentions is not None


def test_patched_beam_search_shares_the_image_keys_and_values():
    """Patched, beam search keeps one row of cross-attention keys and values per image (not
    one per beam, as unpatched) and still returns the unpatched model's tokens."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(initializer_range=0.3), seed=22)
    model = blipfast.patch(copy.deepcopy(original))
    pixels = images(2, torch.Generator().manual_seed(22))
    arguments = dict(max_length=6, num_beams=3, return_dict_in_generate=True)
    expected, actual = original.generate(pixel_values=pixels, **arguments), \
        model.generate(pixel_values=pixels, **arguments)
    assert torch.equal(actual.sequences, expected.sequences)
    expected_cache, actual_cache = getattr(expected, CACHE_NAME), getattr(actual, CACHE_NAME)
    assert expected_cache.cross_attention_cache.layers[0].keys.shape[0] == 6
    assert [layer.keys.shape[0] for layer in actual_cache.cross_attention_cache.layers] \
        == [2] * len(actual_cache.cross_attention_cache.layers)


@pytest.mark.usefixtures("reference_path")
def test_patched_model_saved_whole_loads_patched(kernel_calls):
    """``torch.save(model)`` (pickle) of a patched model loads patched: blipfast's forwards
    and generation methods, not transformers' (a bound method pickles by name and would
    load as the class's own, or fail where the class has none, as ``_reorder_cache``)."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(initializer_range=0.3), seed=23)
    buffer = io.BytesIO()
    torch.save(blipfast.patch(copy.deepcopy(original)), buffer)
    buffer.seek(0)
    model = torch.load(buffer, weights_only=False)
    assert blipfast.is_patched(model)
    # the overrides read as bound methods do: blipfast's docstring, a signature without self
    from blipfast.models.blip.text import BlipTextLMHeadModel

    forward = model.text_decoder.forward
    assert forward.__doc__ == BlipTextLMHeadModel.forward.__doc__
    assert list(inspect.signature(forward).parameters)[:2] == ["input_ids", "attention_mask"]
    generator = torch.Generator().manual_seed(23)
    pixels = images(2, generator)
    arguments = dict(max_length=6, num_beams=3, return_dict_in_generate=True)
    expected, actual = original.generate(pixel_values=pixels, **arguments), \
        model.generate(pixel_values=pixels, **arguments)
    assert torch.equal(actual.sequences, expected.sequences)
    # one row of image keys and values per image: blipfast's generation methods
    assert getattr(actual, CACHE_NAME).cross_attention_cache.layers[0].keys.shape[0] == 2
    inputs = _inputs("BlipForConditionalGeneration", generator)
    kernel_calls.clear()
    error = (model(**inputs).logits - original(**inputs).logits).abs().max().item()
    assert error < TOLERANCE and kernel_calls.get("attention", 0) > 0
    blipfast.unpatch(model)
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_patch_rejects_other_models():
    with pytest.raises(TypeError, match="BLIP"):
        blipfast.patch(torch.nn.Linear(2, 2))
    # a wrapped BLIP model: the message says to patch before wrapping
    model = hf_model("BlipForImageTextRetrieval", tiny_config(), seed=0)
    with pytest.raises(TypeError, match="patch the model before wrapping it"):
        blipfast.patch(torch.compile(model))
    assert not blipfast.is_patched(model)


def test_patch_never_changes_what_it_cannot_restore(monkeypatch):
    """An attribute blipfast's forward needs that the module already has is kept if it
    is an instance attribute of the same value, and otherwise refused, as is a forward the
    instance already overrides (a hook wrapper): refused patches leave no module patched,
    and unpatch leaves wrappers put on top of a patched forward in place."""
    model = hf_model("BlipForConditionalGeneration", tiny_config(), seed=23)
    attention = model.text_decoder.bert.encoder.layer[1].crossattention.self
    attention.is_cross_attention = True  # the value blipfast sets
    blipfast.unpatch(blipfast.patch(model))
    assert attention.__dict__["is_cross_attention"] is True and not blipfast.is_patched(model)

    attention.is_cross_attention = False  # patched after every vision module
    with pytest.raises(RuntimeError, match="crossattention.self already has "
                                           r"\['is_cross_attention'\] with other values "
                                           r"than blipfast's \[True\].*set it after patch"):
        blipfast.patch(model)
    assert not blipfast.is_patched(model) and attention.is_cross_attention is False
    del attention.is_cross_attention

    monkeypatch.setattr(type(model.vision_model.encoder.layers[0].mlp), "activation", "relu",
                        raising=False)
    with pytest.raises(RuntimeError, match=r"\['activation'\]"):
        blipfast.patch(model)
    assert not blipfast.is_patched(model)
    monkeypatch.undo()

    head = model.text_decoder.cls.predictions
    head.forward = wrapper = functools.partial(type(head).forward, head)
    with pytest.raises(RuntimeError, match=r"own \['forward'\]"):
        blipfast.patch(model)
    assert not blipfast.is_patched(model) and head.forward is wrapper
    del head.forward

    blipfast.patch(model)
    head.forward = wrapper = functools.partial(head.forward)
    blipfast.unpatch(model)
    assert head.forward is wrapper and not blipfast.is_patched(model)
    assert not any("is_cross_attention" in module.__dict__ for module in model.modules())


def test_an_interrupted_patch_leaves_every_module_as_it_was(monkeypatch):
    """Ctrl-C at any attribute patch() sets (the first, one inside a module, the last)
    leaves every module's instance dict as before, and a later patch and unpatch restore
    the model exactly."""
    import blipfast.patching as patching

    model = hf_model("BlipForConditionalGeneration", tiny_config(), seed=24)

    def dicts():
        return {name: dict(module.__dict__) for name, module in model.named_modules()}

    before = dicts()
    calls = []

    def interrupting_setattr(target, name, value):
        calls.append(name)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        setattr(target, name, value)

    monkeypatch.setattr(patching, "setattr", interrupting_setattr, raising=False)
    interrupt_at, interrupted = 0, 0
    while True:
        interrupt_at += 1
        calls.clear()
        try:
            blipfast.patch(model)
        except KeyboardInterrupt:
            interrupted += 1
            assert not blipfast.is_patched(model) and dicts() == before, calls[-1]
            continue
        break
    assert interrupted == interrupt_at - 1 >= 30  # every attribute and method it sets
    monkeypatch.undo()
    blipfast.unpatch(model)
    assert dicts() == before


def test_patch_and_unpatch_from_several_threads_at_once(monkeypatch):
    """Threads patching one model at once (each waits at a barrier, and every module patch
    yields to the other threads): the model ends fully patched, each call returns it, and
    unpatch restores it. Interleaved, a patch could patch a module another had patched
    (unpatch then left that forward behind) or undo modules the others had skipped."""
    import threading
    import time

    import blipfast.patching as patching

    model = hf_model("BlipForConditionalGeneration", tiny_config(), seed=25)
    before = {name: dict(module.__dict__) for name, module in model.named_modules()}

    def records():
        return [name for name, module in model.named_modules()
                if patching._PATCHED_ATTRIBUTES in module.__dict__]

    blipfast.patch(model)
    expected = records()
    blipfast.unpatch(model)
    patch_module = patching._patch_module

    def yielding_patch_module(*arguments):
        time.sleep(1e-4)  # let the other threads run between the check and the patch
        patch_module(*arguments)

    monkeypatch.setattr(patching, "_patch_module", yielding_patch_module)
    for operation in (blipfast.patch, blipfast.unpatch, blipfast.patch):
        barrier, results, errors = threading.Barrier(3), [], []

        def run(operation=operation, barrier=barrier, results=results, errors=errors):
            barrier.wait()
            try:
                results.append(operation(model))
            except BaseException as error:  # noqa: BLE001 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and all(result is model for result in results)
        if operation is blipfast.patch:
            assert blipfast.is_patched(model) and records() == expected
        else:
            assert not records() and not blipfast.is_patched(model)
    monkeypatch.undo()
    blipfast.unpatch(model)
    assert {name: dict(module.__dict__) for name, module in model.named_modules()} == before


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_patches_can_patch():
    """The patching lock is new in a forked child: a fork while another thread of the
    parent held it (inside patch) would otherwise leave the child's every patch waiting."""
    import os
    import threading

    import blipfast.patching as patching

    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with patching._PATCHING_LOCK:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait(30)
    try:
        child = os.fork()
        if child == 0:  # the child: exit 0 when the lock is free there
            os._exit(0 if patching._PATCHING_LOCK.acquire(timeout=10) else 1)
        _, status = os.waitpid(child, 0)
    finally:
        release.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0


def test_activations_with_learned_weights_are_called_with_them():
    """PReLU (``hidden_act="prelu"``) holds a learned slope: the patched model calls the
    model's own activation modules, so a trained slope is applied and gets its gradient;
    blipfast's own models, which keep only the activation's name, refuse the config."""
    import blipfast.models as models

    config = tiny_config(hidden_act="prelu", initializer_range=0.3)
    config.vision_config.hidden_act = "prelu"
    original = hf_model("BlipForConditionalGeneration", config, seed=26)
    def is_slope(name):
        return name.endswith(("act_fn.weight", "activation_fn.weight"))

    slopes = [name for name, _ in original.named_parameters() if is_slope(name)]
    assert len(slopes) == 2 + 2 + 1  # ViT layers, text layers, LM head transform
    with torch.no_grad():
        for name, parameter in original.named_parameters():
            if is_slope(name):
                parameter.fill_(-1.5)  # trained away from PReLU's default 0.25
    patched = blipfast.patch(copy.deepcopy(original))
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(26))
    expected, actual = original(**inputs), patched(**inputs)
    assert (actual.logits - expected.logits).abs().max().item() <= TOLERANCE
    expected.loss.backward()
    actual.loss.backward()
    patched_parameters = dict(patched.named_parameters())
    for name, parameter in original.named_parameters():
        if is_slope(name):
            assert patched_parameters[name].grad is not None, name
            assert (patched_parameters[name].grad - parameter.grad).abs().item() <= TOLERANCE
    with pytest.raises(ValueError, match="hidden_act 'prelu' has learned weights"):
        models.BlipForConditionalGeneration.from_hf(original)


@pytest.mark.usefixtures("reference_path")
def test_other_activations_than_exact_gelu_are_kept():
    """A config with other activations (tanh-approximated GELU in the text FFN and head,
    quick GELU in the ViT) runs them, patched and in blipfast's own model, not the exact
    GELU the fused kernels implement: logits and gradients match the unpatched model."""
    import blipfast.models as models

    config = tiny_config(hidden_act="gelu_pytorch_tanh", initializer_range=0.3)
    config.vision_config.hidden_act = "quick_gelu"
    config.vision_config.initializer_range = 0.3  # inputs where the activations differ
    original = hf_model("BlipForConditionalGeneration", config, seed=25)
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(25))
    expected = _assert_patched_and_own_captioning_match(original, inputs)
    exact_gelu = copy.deepcopy(original)
    exact_gelu.config.text_config.hidden_act = exact_gelu.config.vision_config.hidden_act = "gelu"
    # the premise: exact GELU gives other logits
    logits = models.BlipForConditionalGeneration.from_hf(exact_gelu)(**inputs).logits
    assert (logits - expected.logits).abs().max().item() > 10 * TOLERANCE


@pytest.mark.parametrize("side", ["vision", "text"])
def test_patched_model_refuses_attention_dropout_in_training(side):
    """The fused kernel has no attention-probability dropout: a patched model whose config
    asks for it raises in training instead of silently training without it, and runs in
    eval mode (where dropout is off) with the unpatched model's loss."""
    config = tiny_config(attention_probs_dropout_prob=0.1 if side == "text" else 0.0)
    config.vision_config.attention_dropout = 0.1 if side == "vision" else 0.0
    original = hf_model("BlipForConditionalGeneration", config, seed=24)
    model = blipfast.patch(copy.deepcopy(original))
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(24))
    with torch.no_grad():
        assert abs(model(**inputs).loss.item() - original(**inputs).loss.item()) < TOLERANCE
        model.train()
        with pytest.raises(NotImplementedError, match=r"attention dropout \(0.1\)"):
            model(**inputs)


class _LowRankAdaptedLinear(torch.nn.Linear):
    """A LoRA-style layer in a projection's place: its weight is the base weight, and its
    forward adds a low-rank update that a fused op reading ``.weight`` would miss."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(rank)
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator))
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=generator))

    def forward(self, x):
        return super().forward(x) + 0.1 * (x @ self.down.t()) @ self.up.t()


def test_adapted_and_hooked_modules_keep_their_behaviour():
    """Modules that are not plain Linear / LayerNorm layers (LoRA-style layers put in their
    place, layers with forward hooks or with a forward set on the instance) are called, not
    read for their parameters: the patched model's loss and gradients equal the unpatched
    model's, and the hooks (forward hooks and pre-hooks) and instance forwards run."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=21)
    vision_layer = original.vision_model.encoder.layers[1]
    vision_layer.self_attn.qkv = _LowRankAdaptedLinear(vision_layer.self_attn.qkv)
    vision_layer.mlp.fc1 = _LowRankAdaptedLinear(vision_layer.mlp.fc1, rank=3)
    vision_layer.mlp.fc2 = _LowRankAdaptedLinear(vision_layer.mlp.fc2, rank=4)
    text_layer = original.text_decoder.bert.encoder.layer[0]
    text_layer.attention.self.query = _LowRankAdaptedLinear(text_layer.attention.self.query)
    text_layer.intermediate.dense = _LowRankAdaptedLinear(text_layer.intermediate.dense)
    hooked = [vision_layer.layer_norm2, text_layer.output.LayerNorm,
              original.vision_model.encoder.layers[0].mlp.fc1,
              original.text_decoder.bert.encoder.layer[1].output]
    pre_hooked = [original.vision_model.encoder.layers[0].layer_norm1,
                  original.text_decoder.bert.encoder.layer[1].intermediate.dense]
    # a forward set on the instance, as accelerate's hooks set it
    overridden = [original.vision_model.encoder.layers[0].layer_norm2,
                  original.vision_model.encoder.layers[0].mlp.fc2,
                  original.text_decoder.bert.encoder.layer[1].attention.output.LayerNorm,
                  original.text_decoder.cls.predictions.transform.dense]
    calls = []
    for module in hooked:
        module.register_forward_hook(lambda module, args, output: calls.append(module) or output * 1.5)
    for module in pre_hooked:
        module.register_forward_pre_hook(lambda module, args: calls.append(module) or
                                         (args[0] * 1.5,))

    def scaled_forward(module, x):
        calls.append(module)
        return type(module).forward(module, x) * 1.5

    for module in overridden:
        module.forward = functools.partial(scaled_forward, module)  # deep-copies with it
    hooked += pre_hooked + overridden
    original.train()
    patched = blipfast.patch(copy.deepcopy(original))
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(21))
    expected = original(**inputs).loss
    calls_unpatched = len(calls)
    actual = patched(**inputs).loss
    assert calls_unpatched == len(hooked) and len(calls) == 2 * len(hooked)
    assert abs(actual.item() - expected.item()) < TOLERANCE
    expected.backward()
    actual.backward()
    _assert_gradients_match(original, patched)


def _first_tensor(value):
    """The tensor a hook would take first from a module's output: the output itself, its
    first element, or a model output's first field."""
    while not isinstance(value, torch.Tensor):
        value = value[0]
    return value


def test_hooks_on_layers_see_what_they_see_unpatched():
    """Forward hooks on the layers, encoders, attention blocks and activation modules of a
    patched model run and see the unpatched model's outputs (the first element of an
    attention block's pair; the probabilities are None, never formed), and a hook that
    changes an output changes the result as it does unpatched. A layer called directly
    returns transformers' output. An activation module replaced by another is called."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=25)
    text_layer = original.text_decoder.bert.encoder.layer[1]
    text_layer.intermediate.intermediate_act_fn = torch.nn.SiLU()
    original.vision_model.encoder.layers[1].mlp.activation_fn = torch.nn.Tanh()
    patched = blipfast.patch(copy.deepcopy(original))
    hooked = ["vision_model.encoder", "vision_model.encoder.layers.0",
              "vision_model.encoder.layers.1", "vision_model.encoder.layers.0.self_attn",
              "vision_model.encoder.layers.0.mlp.activation_fn",
              "text_decoder.bert.encoder", "text_decoder.bert.encoder.layer.0",
              "text_decoder.bert.encoder.layer.0.attention",
              "text_decoder.bert.encoder.layer.0.crossattention.self",
              "text_decoder.bert.encoder.layer.0.intermediate.intermediate_act_fn",
              "text_decoder.cls.predictions.transform.transform_act_fn"]
    seen = []
    for model in (original, patched):
        modules = dict(model.named_modules())
        outputs = {}
        for name in hooked:
            def record(module, args, output, name=name, outputs=outputs):
                outputs.setdefault(name, _first_tensor(output).clone())

            modules[name].register_forward_hook(record)
        # a hook that changes the first vision layer's output
        modules["vision_model.encoder.layers.0"].register_forward_hook(
            lambda module, args, output: output * 0.5)
        inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(25))
        with torch.no_grad():
            outputs["logits"] = model(**inputs).logits
            outputs["direct call"] = model.vision_model.encoder.layers[1](outputs[hooked[1]])
        seen.append(outputs)
    expected, actual = seen
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        error = (actual[name] - value).abs().max().item()
        assert error < TOLERANCE * max(1.0, value.abs().max().item()), name
    patched_attention = patched.vision_model.encoder.layers[0].self_attn
    assert patched_attention(torch.randn(1, 5, 32))[1] is None


def _assert_runs_as(model, original, inputs, kernel_calls, patched):
    """``model``'s loss on ``inputs`` is ``original``'s, through blipfast's attention
    kernel if ``patched``, else through none of blipfast's ops."""
    kernel_calls.clear()
    with torch.no_grad():
        error = abs(model(**inputs).loss.item() - original(**inputs).loss.item())
    assert error < TOLERANCE
    assert kernel_calls.get("attention", 0) == (6 if patched else 0)
    assert blipfast.is_patched(model) == patched


@pytest.mark.usefixtures("reference_path")
def test_models_under_accelerate_hooks_patch_and_unpatch(tmp_path, kernel_calls):
    """A model dispatched by accelerate (``from_pretrained(..., device_map=...)`` with the
    text decoder offloaded to disk: hooks load its weights at each call) patches: the hooks
    keep running around blipfast's forwards, loss and captions are the unpatched model's,
    and unpatching restores transformers' forwards under the hooks. So too for hooks added
    after patching (``accelerate.cpu_offload``), which unpatching leaves running the
    class's forwards, and for hooks removed again, which leave the model patched."""
    import accelerate
    import transformers

    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=26)
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(26))
    original.save_pretrained(tmp_path / "model")
    dispatched = transformers.BlipForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map={"vision_model": "cpu", "text_decoder": "disk"},
        offload_folder=tmp_path / "offload").eval()
    # the premise: the decoder's weights are not in the module but loaded by hooks
    assert dispatched.text_decoder.cls.predictions.transform.dense.weight.is_meta
    assert blipfast.patch(dispatched) is dispatched
    _assert_runs_as(dispatched, original, inputs, kernel_calls, patched=True)
    pixels = inputs["pixel_values"][:2]
    assert torch.equal(dispatched.generate(pixel_values=pixels, max_length=6),
                       original.generate(pixel_values=pixels, max_length=6))
    blipfast.unpatch(dispatched)
    _assert_runs_as(dispatched, original, inputs, kernel_calls, patched=False)

    hooked_after = blipfast.patch(copy.deepcopy(original))
    accelerate.cpu_offload(hooked_after, execution_device=torch.device("cpu"))
    _assert_runs_as(hooked_after, original, inputs, kernel_calls, patched=True)
    blipfast.unpatch(hooked_after)
    _assert_runs_as(hooked_after, original, inputs, kernel_calls, patched=False)

    unhooked = blipfast.patch(copy.deepcopy(original))
    accelerate.cpu_offload(unhooked, execution_device=torch.device("cpu"))
    accelerate.hooks.remove_hook_from_module(unhooked, recurse=True)
    _assert_runs_as(unhooked, original, inputs, kernel_calls, patched=True)
    blipfast.unpatch(unhooked)
    _assert_runs_as(unhooked, original, inputs, kernel_calls, patched=False)
    for model in (dispatched, hooked_after, unhooked):
        for module in model.modules():
            assert not any(isinstance(value, blipfast.patching.PatchedMethod)
                           for value in module.__dict__.values())


@pytest.mark.usefixtures("reference_path")
def test_peft_models_patch_before_or_after_wrapping(kernel_calls):
    """A LoRA model made by PEFT patches (its transformers model, in place), and so does a
    patched model wrapped by PEFT afterwards: the adapter layers are called, not fused
    away, so loss and the adapters' gradients are the unpatched PEFT model's."""
    import peft

    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=27)
    config = peft.LoraConfig(r=2, target_modules=["qkv", "fc1", "query", "value", "dense"],
                             init_lora_weights=False)  # random adapters: not a no-op
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(27))
    torch.manual_seed(27)
    expected_model = peft.get_peft_model(copy.deepcopy(original), config)
    adapted_after = copy.deepcopy(expected_model)
    expected = expected_model(**inputs).loss
    expected.backward()
    assert blipfast.patch(adapted_after) is adapted_after and blipfast.is_patched(adapted_after)
    models = [adapted_after]
    # patch first, then wrap: the same adapters, on a patched model
    patched_first = blipfast.patch(copy.deepcopy(original))
    wrapped = peft.get_peft_model(patched_first, config)
    wrapped.load_state_dict(expected_model.state_dict())
    models.append(wrapped)
    for model in models:
        kernel_calls.clear()
        actual = model(**inputs).loss
        assert kernel_calls["attention"] == 6
        assert abs(actual.item() - expected.item()) < TOLERANCE
        actual.backward()
        _assert_gradients_match(expected_model, model)
        blipfast.unpatch(model)
        assert not blipfast.is_patched(model)


@pytest.mark.interpreter
def test_patched_model_recomputes_projection_outputs_on_request(monkeypatch):
    """models.recompute_projection_outputs works on a patched transformers encoder: the
    backward recomputes each layer's two projections, and the gradients are bit for bit
    those of the patched model that keeps the outputs."""
    import torch.nn.functional as F

    import blipfast.models as models

    original = hf_model("BlipForConditionalGeneration", tiny_config(initializer_range=0.3), seed=22)
    original.train()
    keeping = blipfast.patch(copy.deepcopy(original))
    recomputing = blipfast.patch(copy.deepcopy(original))
    models.recompute_projection_outputs(recomputing.vision_model.encoder)
    assert recomputing.vision_model.encoder.layers[0].mlp.recompute_projection_output
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(22))
    linear, calls = F.linear, []
    for model in (keeping, recomputing):
        loss = model(**inputs).loss
        with monkeypatch.context() as patch:
            patch.setattr(F, "linear", lambda *args, **kwargs: calls.append(model) or
                          linear(*args, **kwargs))
            loss.backward()
    layer_count = len(recomputing.vision_model.encoder.layers)
    assert calls.count(keeping) == 0 and calls.count(recomputing) == 2 * layer_count
    for (name, a), (_, b) in zip(keeping.named_parameters(), recomputing.named_parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name
    blipfast.unpatch(recomputing)
    assert not hasattr(recomputing.vision_model.encoder.layers[0].mlp,
                       "recompute_projection_output")


def _enable_checkpointing(model, every_n_layers: int = 1, **checkpoint_options) -> None:
    """transformers' activation checkpointing switch, under this transformers' names."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable  # renamed in transformers 5.2x
    parameters = inspect.signature(enable).parameters
    options = {}
    if every_n_layers != 1:
        if "every_n_layers" not in parameters:
            pytest.skip("this transformers has no every_n_layers")
        options["every_n_layers"] = every_n_layers
    if checkpoint_options:
        options[next(name for name in parameters if name.endswith("checkpointing_kwargs"))] = \
            checkpoint_options
    enable(**options)


@pytest.mark.parametrize("every_n_layers, checkpoint_options",
                         [(1, {}), (2, {}), (1, {"use_reentrant": True})],
                         ids=["every_layer", "every_2nd_layer", "reentrant"])
def test_activation_checkpointing_follows_transformers_options(every_n_layers, checkpoint_options):
    """Patched and blipfast's own models checkpoint the layers transformers' options pick
    (``every_n_layers``), each once, through the checkpoint function transformers stores
    (which carries ``use_reentrant`` and ``offload``); the gradients, the image's through
    cross-attention under a reentrant checkpoint included, are the unpatched model's
    without checkpointing."""
    import blipfast.models as models

    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=23)
    original.train()
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(23))
    pixels = inputs["pixel_values"].requires_grad_()
    original(**inputs).loss.backward()
    expected_pixel_gradient = pixels.grad
    for model in (blipfast.patch(copy.deepcopy(original)),
                  models.BlipForConditionalGeneration.from_hf(original)):
        _enable_checkpointing(model, every_n_layers, **checkpoint_options)
        model.train()
        model.zero_grad(set_to_none=True)
        pixels.grad = None
        stack = [*model.vision_model.encoder.layers, *model.text_decoder.bert.encoder.layer]
        runs = [0] * len(stack)
        for index, layer in enumerate(stack):
            layer.register_forward_pre_hook(
                lambda *_, index=index: runs.__setitem__(index, runs[index] + 1))
        checkpoints = []
        for module in model.modules():
            function = module.__dict__.get("_gradient_checkpointing_func")
            if function is not None:
                module._gradient_checkpointing_func = \
                    lambda *args, _function=function, **kwargs: \
                    checkpoints.append(1) or _function(*args, **kwargs)
        model(**inputs).loss.backward()
        # Counted over the ViT layers then the text layers, as transformers counts.
        expected_runs = [2 if index % every_n_layers == 0 else 1 for index in range(len(stack))]
        assert runs == expected_runs, type(model).__module__
        assert len(checkpoints) == expected_runs.count(2)
        _assert_gradients_match(original, model)
        assert (pixels.grad - expected_pixel_gradient).abs().max().item() <= \
            TOLERANCE * expected_pixel_gradient.abs().max().item()


def test_checkpointing_skips_what_it_cannot_recompute():
    """No checkpoint outside training, without autograd, or for a layer given a decoding
    cache (its recomputation would write the cache twice)."""
    from blipfast.models.blip import layers

    model = blipfast.patch(hf_model("BlipForConditionalGeneration", tiny_config(), seed=24))
    _enable_checkpointing(model)
    encoder = model.text_decoder.bert.encoder
    layer = encoder.layer[0]
    model.train()
    assert layers.checkpoint_function(encoder, layer, {"cache": None}) is not None
    assert layers.checkpoint_function(encoder, layer, {"cache": object()}) is None
    with torch.no_grad():
        assert layers.checkpoint_function(encoder, layer, {}) is None
    model.eval()
    assert layers.checkpoint_function(encoder, layer, {}) is None


@pytest.mark.parametrize("head_dims", [(8, 8), (136, 16)], ids=["vision_8_text_8", "vision_136_text_16"])
def test_head_dims_outside_the_kernels_run_the_reference(head_dims, kernel_calls):
    """Head dims the attention kernels do not take (below 16, as in tiny test models, or
    above 128) run the PyTorch reference, with a warning, patched and in blipfast's own
    model, instead of failing: logits and gradients match the unpatched model."""
    vision_head_dim, text_head_dim = head_dims
    config = tiny_config(num_attention_heads=32 // text_head_dim if text_head_dim < 32 else 1,
                         hidden_size=32)
    vision_heads = max(1, 32 // vision_head_dim)
    config.vision_config.num_attention_heads = vision_heads
    config.vision_config.hidden_size = config.text_config.encoder_hidden_size = \
        vision_heads * vision_head_dim
    original = hf_model("BlipForConditionalGeneration", config, seed=26)
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(26))

    def forward(model):
        kernel_calls.clear()
        with pytest.warns(UserWarning, match=f"attention head dim {vision_head_dim} is outside"):
            output = model(**inputs)
        # the text attention runs the op where its head dim is in range (4 per pass)
        assert kernel_calls.get("attention", 0) == (0 if text_head_dim < 16 else 4)
        return output

    _assert_patched_and_own_captioning_match(original, inputs, forward)


def test_float64_models_run_the_references(kernel_calls):
    """A float64 model (``model.double()``, e.g. for gradient checks): the kernels take
    float16, bfloat16 and float32 only, so patched and blipfast's own model run the
    PyTorch references and the modules themselves in float64, with a warning, instead of
    failing: transformers' logits and gradients to float64 precision (1e-10, where a
    float32 computation would be off by about 1e-7)."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=31).double()
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(31))
    inputs["pixel_values"] = inputs["pixel_values"].double()

    def forward(model):
        kernel_calls.clear()
        with pytest.warns(UserWarning, match="not torch.float64; this model runs the PyTorch"):
            output = model(**inputs)
        assert output.logits.dtype == output.loss.dtype == torch.float64
        assert kernel_calls == {}
        return output

    _assert_patched_and_own_captioning_match(original, inputs, forward, tolerance=1e-10)


@pytest.mark.parametrize("task, dynamic", [
    ("BlipForImageTextRetrieval", False),
    ("BlipForConditionalGeneration", True),
], ids=["retrieval", "captioning_dynamic"])
def test_models_compile_as_one_graph(task, dynamic):
    """blipfast's models and patched transformers models compile without a graph break
    (fullgraph=True raises on one), as transformers' own do, with the eager outputs and
    gradients. Sharing cross-attention keys and values between passes is Python state the
    graph cannot hold; it must step aside under compilation, not break the graph. With
    dynamic=True (shapes symbolic, as users compile for varying text lengths) the ops'
    checks of float arguments (LayerNorm's eps) must trace too, and a second, longer text
    batch runs in the same compiled model. (Static captioning and VQA, built of the same
    layers, pass too; left out for the suite's time.)"""
    import torch._dynamo

    import blipfast.models as models

    config = tiny_config()
    if dynamic:  # one layer each side: a dynamic compile takes longer
        config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = 1
    original = hf_model(task, config, seed=27).train()
    generator = torch.Generator().manual_seed(27)
    batches = [_inputs(task, generator)]
    if dynamic:
        longer = _inputs(task, generator)
        ids, mask = text_batch(3, 11, generator, pad_last_from=7)
        longer.update(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        batches.append(longer)
    for model in (blipfast.patch(copy.deepcopy(original)), getattr(models, task).from_hf(original)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic)
        for inputs in batches:
            model.zero_grad(set_to_none=True)
            expected = model(**inputs)
            _scalar_of(expected).backward()
            eager = copy.deepcopy(model)  # deepcopy leaves .grad behind: copied over
            for (_, copied), (_, parameter) in zip(eager.named_parameters(),
                                                   model.named_parameters()):
                copied.grad = None if parameter.grad is None else parameter.grad.clone()
            model.zero_grad(set_to_none=True)
            actual = compiled(**inputs)
            assert (_scalar_of(actual) - _scalar_of(expected)).abs().item() < TOLERANCE
            _scalar_of(actual).backward()
            _assert_gradients_match(eager, model)
    torch._dynamo.reset()


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("task", TASKS)
def test_patched_models_take_the_keyword_arguments_transformers_takes(task):
    """transformers' task models pass what they take through ``**kwargs``
    (``num_items_in_batch`` from ``transformers.Trainer``, ``use_cache``, ...) on to their
    vision and text models, which run blipfast's forwards once patched: the unpatched
    results."""
    original = hf_model(task, tiny_config(), seed=40)
    patched = blipfast.patch(copy.deepcopy(original))
    inputs = _inputs(task, torch.Generator().manual_seed(40))
    with torch.no_grad():
        # token_type_ids: what a BERT tokenizer returns (BLIP has no token types);
        # head_mask=None: what code written for BERT passes
        for extra in (dict(num_items_in_batch=torch.tensor(7)), dict(use_cache=False),
                      dict(token_type_ids=torch.zeros_like(inputs["input_ids"])),
                      dict(head_mask=None)):
            expected = _scalar_of(original(**inputs, **extra))
            assert (_scalar_of(patched(**inputs, **extra)) - expected).abs().item() < TOLERANCE
        # what nothing would honour raises instead of being ignored
        with pytest.raises(ValueError, match="head_mask is not supported"):
            patched(**inputs, head_mask=torch.ones(2, 2))
        with pytest.raises(TypeError, match="unexpected keyword arguments.*input_idz"):
            patched(**inputs, input_idz=inputs["input_ids"])


def test_patched_models_attend_one_image_from_several_texts(monkeypatch):
    """One image and three texts (``BlipProcessor(images=image, text=[...])``): the
    unpatched results (transformers broadcasts the image), with the image's keys and
    values read through an index of zeros rather than repeated."""
    from blipfast.models.blip import layers

    key_batches, attention = set(), layers.attention

    def recording(query, key, value, **options):
        if query.shape[0] == 3 and key.shape[1] == 17:  # text rows attending image tokens
            key_batches.add(key.shape[0])
        return attention(query, key, value, **options)

    monkeypatch.setattr(layers, "attention", recording)
    generator = torch.Generator().manual_seed(41)
    pixels, (ids, mask) = images(1, generator), text_batch(3, 6, generator, pad_last_from=4)
    calls = {
        "BlipForImageTextRetrieval":
            lambda model: model(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score,
        "BlipForConditionalGeneration":
            lambda model: model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                labels=ids).loss,
        "BlipForQuestionAnswering":
            lambda model: model.generate(input_ids=ids[:, :4], pixel_values=pixels,
                                         max_length=4).float(),
    }
    for task, call in calls.items():
        original = hf_model(task, tiny_config(), seed=41)
        patched = blipfast.patch(copy.deepcopy(original))
        with torch.no_grad():
            expected, actual = call(original), call(patched)
        assert actual.shape == expected.shape and (actual - expected).abs().max() < TOLERANCE, task
    assert key_batches == {1}


def test_patched_submodels_follow_their_config_defaults():
    """Not passed, ``output_hidden_states``, ``use_cache`` and ``return_dict`` are the
    config's, as unpatched (transformers reads them from the config)."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=42)
    original.config.vision_config.output_hidden_states = True
    original.config.text_config.output_hidden_states = True
    patched = blipfast.patch(copy.deepcopy(original))
    generator = torch.Generator().manual_seed(42)
    pixels, (ids, _) = images(2, generator), text_batch(2, 6, generator)
    image_states = torch.randn(2, 17, 32, generator=generator)
    with torch.no_grad():
        for call in (lambda model: model.vision_model(pixels),
                     lambda model: model.text_decoder.bert(input_ids=ids),
                     lambda model: model.text_decoder(input_ids=ids,
                                                      encoder_hidden_states=image_states)):
            expected, actual = call(original), call(patched)
            assert len(actual.hidden_states) == len(expected.hidden_states) == 3
            for mine, theirs in zip(actual.hidden_states, expected.hidden_states):
                assert (mine - theirs).abs().max() < TOLERANCE
            assert (getattr(actual, CACHE_NAME, None) is None) == \
                (getattr(expected, CACHE_NAME, None) is None)
        assert getattr(patched.text_decoder(input_ids=ids, encoder_hidden_states=image_states),
                       CACHE_NAME) is not None
        patched.vision_model.config.return_dict = False
        assert isinstance(patched.vision_model(pixels), tuple)


@pytest.mark.parametrize("config_of", ["vision_config", "text_config"])
def test_output_attentions_in_the_config_raises(config_of):
    """transformers returns attention probabilities when the config asks for them; the
    fused kernel has none, so a patched model raises, as for the argument, instead of
    returning ``attentions=None``."""
    model = blipfast.patch(hf_model("BlipForConditionalGeneration", tiny_config(), seed=43))
    setattr(getattr(model.config, config_of), "output_attentions", True)
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(43))
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions=True"):
        model(**inputs)


@pytest.mark.usefixtures("reference_path")
def test_packed_texts_may_be_longer_than_the_position_table():
    """Given position ids (packed texts whose positions restart) are used as they are; only
    the default positions are bounded by ``max_position_embeddings``."""
    # a short position table: generating past it takes few steps
    original = hf_model("BlipForConditionalGeneration", tiny_config(max_position_embeddings=8),
                        seed=44)
    patched = blipfast.patch(copy.deepcopy(original))
    generator = torch.Generator().manual_seed(44)
    positions = original.config.text_config.max_position_embeddings
    ids, _ = text_batch(2, 2 * positions, generator)  # two packed texts, positions restart
    restarting = torch.cat([torch.arange(positions)] * 2).expand(2, -1)
    image_states = torch.randn(2, 17, 32, generator=generator)
    with torch.no_grad():
        expected = original.text_decoder(input_ids=ids, position_ids=restarting,
                                         encoder_hidden_states=image_states).logits
        actual = patched.text_decoder(input_ids=ids, position_ids=restarting,
                                      encoder_hidden_states=image_states).logits
        assert (actual - expected).abs().max() < TOLERANCE
        with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
            patched.text_decoder(input_ids=ids, encoder_hidden_states=image_states)
        # generate passes position ids at every step: decoding past the table is refused
        # with the same message, not an index error (a device-side assert on a GPU)
        pixels = images(2, generator)
        for model in (patched, blipfast.models.BlipForConditionalGeneration.from_hf(original)):
            with pytest.raises(ValueError, match="exceeds max_position_embeddings.*reach"):
                model.generate(pixel_values=pixels, max_new_tokens=positions + 2,
                               min_new_tokens=positions + 2)


@pytest.mark.usefixtures("reference_path")
def test_attention_dropout_set_after_patching_counts():
    """The attention modules' dropout probability is read when they run, not when they were
    patched: set after patching, it is refused in training; cleared after patching (a model
    built with attention dropout), training runs, with the unpatched model's loss."""
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(45))
    model = blipfast.patch(hf_model("BlipForConditionalGeneration", tiny_config(), seed=45))
    model.train()
    model.vision_model.encoder.layers[1].self_attn.dropout.p = 0.5
    with pytest.raises(NotImplementedError, match=r"attention dropout \(0.5\)"):
        model(**inputs)
    model.vision_model.encoder.layers[1].self_attn.dropout.p = 0.0
    model.text_decoder.bert.encoder.layer[0].crossattention.self.dropout.p = 0.25
    with pytest.raises(NotImplementedError, match=r"attention dropout \(0.25\)"):
        model(**inputs)

    config = tiny_config(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.0)
    config.vision_config.attention_dropout = 0.1
    original = hf_model("BlipForConditionalGeneration", config, seed=45)
    patched = blipfast.patch(copy.deepcopy(original)).train()
    with pytest.raises(NotImplementedError, match=r"attention dropout \(0.1\)"):
        patched(**inputs)
    for model in (original, patched):  # cleared after patching
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    original.train()
    expected = original(**inputs).loss.item()
    assert abs(patched(**inputs).loss.item() - expected) < TOLERANCE
    # or switched off by putting nn.Identity in the dropout's place
    identity = blipfast.patch(hf_model("BlipForConditionalGeneration", config, seed=45)).train()
    for module in identity.modules():
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout = torch.nn.Identity()
    assert abs(identity(**inputs).loss.item() - expected) < TOLERANCE


@pytest.mark.usefixtures("reference_path")
def test_a_transformers_layer_put_into_a_patched_model_raises_until_patched():
    """blipfast's forwards call their submodules with blipfast's arguments; a transformers
    module put in after patching would take them through its ``**kwargs`` and misread them
    (wrong logits, no error). It raises instead, and patching again patches it."""
    from transformers.models.blip.modeling_blip import BlipEncoderLayer
    from transformers.models.blip.modeling_blip_text import BlipTextAttention, BlipTextLayer

    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=46)
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(46))
    text_config = original.config.text_config
    replacements = {
        "text_decoder.bert.encoder.layer.1": lambda: BlipTextLayer(text_config, 1),
        "text_decoder.bert.encoder.layer.0.crossattention":
            lambda: BlipTextAttention(text_config, is_cross_attention=True, layer_idx=0),
    }
    with torch.no_grad():
        expected = original(**inputs).logits
        for path, build in replacements.items():
            model = blipfast.patch(copy.deepcopy(original))
            parent, _, name = path.rpartition(".")
            fresh = build()
            fresh.load_state_dict(model.get_submodule(path).state_dict())
            setattr(model.get_submodule(parent), name, fresh)
            with pytest.raises(RuntimeError,
                               match="holds an unpatched .*put in after patching.*patch"):
                model(**inputs)
            blipfast.patch(model)
            assert (model(**inputs).logits - expected).abs().max() < TOLERANCE, path

    # a subclass (or a wrapper's class, as fully_shard gives a sharded layer) is left
    # unpatched by patch(): it raises, saying so
    class MyTextLayer(BlipTextLayer):
        pass

    model = copy.deepcopy(original)
    layer = MyTextLayer(text_config, 1)
    layer.load_state_dict(model.text_decoder.bert.encoder.layer[1].state_dict())
    model.text_decoder.bert.encoder.layer[1] = layer
    blipfast.patch(model)
    with torch.no_grad(), pytest.raises(RuntimeError, match="derives from transformers' "
                                                            "BlipTextLayer"):
        model(**inputs)

    # a ViT layer that runs transformers' forward (put in after patching, or a subclass:
    # what fully_shard makes of a sharded layer) is called as transformers calls it
    class MyVisionLayer(BlipEncoderLayer):
        pass

    for layer_class in (BlipEncoderLayer, MyVisionLayer):
        model = blipfast.patch(copy.deepcopy(original))
        layer = layer_class(original.config.vision_config)
        layer.load_state_dict(model.vision_model.encoder.layers[0].state_dict())
        model.vision_model.encoder.layers[0] = layer
        with torch.no_grad():
            assert (model(**inputs).logits - expected).abs().max() < TOLERANCE, layer_class


def test_modules_that_cannot_run_patched_alone_are_refused():
    """A module whose blipfast forward takes other arguments than transformers passes it,
    or that reads a config its module does not hold, is refused as the model given to
    ``patch`` (its transformers caller would fail or misread it); others patch on their
    own and run inside the unpatched model with its results."""
    model = hf_model("BlipForConditionalGeneration", tiny_config(), seed=47)
    for path in ("text_decoder.bert.encoder", "text_decoder.bert.encoder.layer.0",
                 "text_decoder.bert.encoder.layer.0.attention",
                 "text_decoder.bert.encoder.layer.0.crossattention.self",
                 "text_decoder.bert.encoder.layer.0.intermediate", "text_decoder.cls",
                 "vision_model.encoder.layers.0", "vision_model.encoder.layers.0.self_attn"):
        with pytest.raises(TypeError, match="cannot be patched on its own"):
            blipfast.patch(model.get_submodule(path))
        assert not blipfast.is_patched(model), path
    inputs = _inputs("BlipForConditionalGeneration", torch.Generator().manual_seed(47))
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).logits
        for path in ("vision_model", "vision_model.encoder", "vision_model.encoder.layers.0.mlp",
                     "text_decoder.bert", "text_decoder.bert.encoder.layer.0.output"):
            copied = copy.deepcopy(model)
            blipfast.patch(copied.get_submodule(path))
            assert blipfast.is_patched(copied)
            actual = copied(**inputs, output_hidden_states=True).logits
            assert (actual - expected).abs().max() < TOLERANCE, path


def test_a_patched_submodel_exports():
    """``torch.export`` reads the forward's code object: a patched model's forward passes
    its function's attributes on, as a bound method does, and the exported program gives
    the patched model's output."""
    original = hf_model("BlipForConditionalGeneration", tiny_config(), seed=48).eval()
    pixels = images(2, torch.Generator().manual_seed(48))
    patched = blipfast.patch(copy.deepcopy(original.vision_model))
    assert patched.forward.__code__ is patched.forward.__func__.__code__
    exported = torch.export.export(patched, (pixels,))
    with torch.no_grad():
        expected = original.vision_model(pixels).last_hidden_state
        actual = exported.module()(pixels).last_hidden_state
    assert (actual - expected).abs().max() < TOLERANCE


def test_a_deleted_patched_model_is_freed_with_its_last_reference():
    """Patched modules held their blipfast forward and it held them: every patched module
    was a reference cycle, so a deleted patched model (its GPU memory too) stayed until
    Python's garbage collector ran. A forward kept after its module is gone says so."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = blipfast.patch(hf_model("BlipForConditionalGeneration", tiny_config(), 0))
        alive = weakref.ref(model.vision_model.encoder.layers[0].self_attn)
        kept_forward = model.vision_model.encoder.layers[0].self_attn.forward
        del model
        assert alive() is None
    finally:
        gc.enable()
    with pytest.raises(ReferenceError, match="the module it was bound to has been deleted"):
        kept_forward(torch.zeros(1, 5, 32))


def test_a_patched_method_pickled_by_the_earlier_layout_loads():
    """Before the weak reference, a patched method pickled its module as ``__self__``:
    such a saved model still loads."""
    from blipfast.patching import PatchedMethod

    model = blipfast.patch(hf_model("BlipForConditionalGeneration", tiny_config(), 0))
    method = model.vision_model.forward
    state = method.__getstate__()
    state["__self__"] = state.pop("_module")
    restored = PatchedMethod.__new__(PatchedMethod)
    restored.__setstate__(state)
    assert restored.__self__ is model.vision_model and restored.__func__ is method.__func__
