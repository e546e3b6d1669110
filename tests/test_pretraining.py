"""blipfast.train: BLIP's pre-training step against a straightforward PyTorch
implementation on transformers' modules (tests/pretraining_reference.py), in one process
and under DistributedDataParallel on 2 gloo processes (CPU, Triton interpreter, fp32).

Tolerance: losses within 1e-5 relative, every parameter, momentum copy and queue entry
within 1e-4 of its tensor's largest value after two SGD steps (fp32 rounding differs
between the fused kernels and the materialized reference; measured: ~3e-5).
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip_models import images, text_batch, tiny_config
from distributed_harness import run_on_ranks
from pretraining_reference import ReferencePreTraining, blipfast_state_dict
from tolerances import assert_close_to_reference

from blipfast.train import BlipForPreTraining, FeatureQueue, momentum_update_, ramped_alpha

CLS = 1  # the tiny vocabulary's [CLS]
LOSS_RTOL = 1e-5
# Later steps' losses carry the first step's rounding through the update, and one scalar
# can magnify it: an SGD step of LEARNING_RATE can leave the temperature near its lower
# bound (0.07 - 0.1 * 0.657 = 0.0043), where the step's float32 rounding (2e-6 of its
# gradient) becomes 4e-5 of its value, and the next ITC loss moves with it (3.9e-5 apart
# in one of 10 seeds drawn with other data; at most 3e-7 in the first step).
LATER_STEP_LOSS_RTOL = 1e-4
STATE_RTOL = 1e-4
STEPS = 2
LEARNING_RATE = 0.1

CASES = {
    # queue of 4 with batches of 3: the second step wraps around
    "plain": dict(batch=3, queue_size=4, alpha=0.3, ids=None, encoder_token_id=5,
                  checkpointing=False),
    # repeated image ids (positives within the batch and the queue), checkpointing, ITM
    # negatives drawn as blip_pretrain.py draws them
    "ids": dict(batch=4, queue_size=6, alpha=0.4, ids=[0, 1, 0, 2], encoder_token_id=None,
                checkpointing=True, matching_negatives="blip_pretrain"),
}


def _models(case: dict, seed: int = 0):
    config = tiny_config()
    reference = ReferencePreTraining(config, queue_size=case["queue_size"], momentum=0.9,
                                     encoder_token_id=case["encoder_token_id"], seed=seed)
    model = BlipForPreTraining(config, queue_size=case["queue_size"], momentum=0.9,
                               encoder_token_id=case["encoder_token_id"],
                               matching_negatives=case.get("matching_negatives",
                                                           "blip_retrieval"))
    model.load_state_dict(blipfast_state_dict(reference), strict=True)
    if case["checkpointing"]:
        model.activation_checkpointing_enable()
        assert model.text_decoder.bert.encoder.layer[0].gradient_checkpointing
    return model.train(), reference.train()


def _batch(case: dict, step: int, rank: int = 0, batch: int | None = None):
    generator = torch.Generator().manual_seed(100 * step + rank)
    batch = batch or case["batch"]
    input_ids, attention_mask = text_batch(batch, 7, generator, pad_last_from=4)
    input_ids[:, 0] = CLS  # as BLIP's tokenizer gives captions; the decoder puts BOS there
    ids = torch.tensor(case["ids"][:batch]) + 10 * rank if case["ids"] else None
    return images(batch, generator), input_ids, attention_mask, ids


def _train(model, reference, case, rank=0, batch=None, wrap=lambda module: module,
           wrap_reference=None, prepare_outside_forward=False):
    """Two SGD steps of both; per step (blipfast losses, reference losses, negatives)."""
    wrapped, wrapped_reference = wrap(model), (wrap_reference or wrap)(reference)
    optimizer = torch.optim.SGD(list(model.trainable_parameters()), lr=LEARNING_RATE)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=LEARNING_RATE)
    history = []
    if prepare_outside_forward:  # FSDP: preparing inside forward would be lost, so raises
        with pytest.raises(RuntimeError, match="prepare_step.*before each forward"):
            wrapped(*_batch(case, 0, rank, batch)[:3], prepare=True)
    for step in range(STEPS):
        pixel_values, input_ids, attention_mask, ids = _batch(case, step, rank, batch)
        if prepare_outside_forward:
            model.prepare_step()
        output = wrapped(pixel_values, input_ids, attention_mask, alpha=case["alpha"],
                         image_ids=ids, generator=torch.Generator().manual_seed(step),
                         prepare=not prepare_outside_forward)
        reference_losses = wrapped_reference(pixel_values, input_ids, attention_mask, case["alpha"],
                                             output.negative_text_index,
                                             output.negative_image_index, image_ids=ids)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        sum(reference_losses).backward()
        reference_optimizer.step()
        history.append((torch.stack([output.loss_itc, output.loss_itm, output.loss_lm]).detach(),
                        torch.stack(reference_losses).detach(),
                        output.negative_text_index, output.negative_image_index, ids))
    return history


def _assert_history(history, batch):
    for step, record in enumerate(history):
        losses, reference_losses, negative_texts, negative_images, ids = record
        torch.testing.assert_close(losses, reference_losses, atol=0,
                                   rtol=LOSS_RTOL if step == 0 else LATER_STEP_LOSS_RTOL)
        ids = ids if ids is not None else torch.arange(batch)
        for negatives in (negative_texts, negative_images):
            assert negatives.shape == (batch,) and negatives.dtype == torch.int64
            assert bool(((negatives >= 0) & (negatives < batch)).all())
            assert not bool((ids[negatives] == ids).any()), "a positive was drawn as negative"


def _assert_states_close(state, reference_state):
    assert state.keys() == reference_state.keys()
    for key, expected in reference_state.items():
        actual = state[key]
        if not expected.is_floating_point():
            assert torch.equal(actual, expected), key
            continue
        scale = expected.abs().max().item() or 1.0
        error = (actual.double() - expected.double()).abs().max().item()
        assert error <= STATE_RTOL * scale, f"{key}: error {error:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("case_name", list(CASES))
def test_steps_match_reference(case_name):
    case = CASES[case_name]
    model, reference = _models(case)
    history = _train(model, reference, case)
    _assert_history(history, case["batch"])
    _assert_states_close(model.state_dict(), blipfast_state_dict(reference))


def _distributed_rank(rank, world_size, case, sizes, wrapper):
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    def ddp(module):
        return DistributedDataParallel(module, broadcast_buffers=False)

    def fsdp(module):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module, mesh=init_device_mesh("cpu", (world_size,)))

    model, reference = _models(case)  # same seed on every rank: same initial weights
    history = _train(model, reference, case, rank=rank, batch=sizes[rank],
                     wrap=ddp if wrapper == "ddp" else fsdp, wrap_reference=ddp,
                     prepare_outside_forward=wrapper == "fsdp")
    state = {key: value.full_tensor() if isinstance(value, DTensor) else value
             for key, value in model.state_dict().items()}
    return history, state, blipfast_state_dict(reference)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_match_reference(wrapper):
    """DDP, and FSDP's fully_shard (temperature clamp and momentum update called before
    forward), on 2 processes with uneven local batches (3 and 2) against the reference
    under DDP: per-rank losses, gradients averaged over ranks, queues filled with both
    ranks' momentum features in rank order."""
    case, sizes = dict(CASES["plain"], queue_size=7), [3, 2]
    results = run_on_ranks(2, _distributed_rank, case, sizes, wrapper, timeout_s=300)
    for rank, (history, state, reference_state) in enumerate(results):
        _assert_history(history, sizes[rank])
        _assert_states_close(state, reference_state)
    first_state = results[0][1]
    for key, value in results[1][1].items():
        assert torch.equal(value, first_state[key]), f"ranks disagree on {key}"
    assert int(first_state["queue.pointer"]) == (STEPS * sum(sizes)) % case["queue_size"]


def test_rows_without_negatives_get_no_itm_weight():
    """A batch of one, and a batch whose captions all share one image: no negative exists;
    the ITM loss is then the positive pairs' cross-entropy alone, and stays finite."""
    model = BlipForPreTraining(tiny_config(), queue_size=4).eval()
    for batch, ids in ((1, None), (2, torch.tensor([7, 7]))):
        pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0, batch=batch)
        output = model(pixel_values, input_ids, attention_mask, image_ids=ids)
        assert output.negative_text_index.tolist() == [-1] * batch
        assert output.negative_image_index.tolist() == [-1] * batch
        image_embeds = model.vision_model(pixel_values).last_hidden_state
        states = model.text_encoder(input_ids, attention_mask=attention_mask,
                                    encoder_hidden_states=image_embeds).last_hidden_state
        expected = F.cross_entropy(model.itm_head(states[:, 0]),
                                   torch.ones(batch, dtype=torch.long))
        torch.testing.assert_close(output.loss_itm, expected, rtol=1e-5, atol=1e-6)
        output.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters()
                   if p.grad is not None)


@pytest.mark.usefixtures("reference_path")
def test_eval_mode_leaves_momentum_encoders_and_queue_alone():
    model = BlipForPreTraining(tiny_config(), queue_size=4).eval()
    with torch.no_grad():
        for parameter in model.vision_proj.parameters():
            parameter.add_(1.0)  # online and momentum differ: an update would show
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    with torch.no_grad():
        model(pixel_values, input_ids, attention_mask)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # A temperature outside [0.001, 0.5] is used clamped, and not changed, in eval mode.
    losses = []
    with torch.no_grad():
        for temperature in (1e-4, 1e-3):
            model.temp.fill_(temperature)
            losses.append(model(pixel_values, input_ids, attention_mask).loss_itc)
            assert model.temp.item() == pytest.approx(temperature)
    assert torch.equal(losses[0], losses[1])


def test_a_validation_step_runs_under_inference_mode():
    """torch.inference_mode, the usual validation context: the losses of the same step
    under no_grad (inference tensors have no version counter, so the image keys and values
    are projected again for the decoder instead of shared)."""
    model = BlipForPreTraining(tiny_config(), queue_size=4).eval()
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    outputs = []
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            outputs.append(model(pixel_values, input_ids, attention_mask,
                                 generator=torch.Generator().manual_seed(3)))
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.allclose(getattr(outputs[0], name), getattr(outputs[1], name),
                              rtol=1e-5, atol=1e-6), name


def test_encoder_and_decoder_share_all_but_self_attention():
    model = BlipForPreTraining(tiny_config(), queue_size=4)
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    assert decoder.embeddings is encoder.embeddings
    for encoder_layer, decoder_layer in zip(encoder.encoder.layer, decoder.encoder.layer):
        assert decoder_layer.crossattention is encoder_layer.crossattention
        assert decoder_layer.intermediate is encoder_layer.intermediate
        assert decoder_layer.output is encoder_layer.output
        assert decoder_layer.attention is not encoder_layer.attention
        assert decoder_layer.attention.self.query.weight.data_ptr() != \
            encoder_layer.attention.self.query.weight.data_ptr()
    # BLIP_Pretrain's LM head is a matrix of its own (tie_encoder_decoder_weights swaps the
    # decoder's word embeddings for the encoder's after the head was tied to them)
    head = model.text_decoder.cls.predictions.decoder.weight
    assert head.data_ptr() != encoder.embeddings.word_embeddings.weight.data_ptr()
    trainable = list(model.trainable_parameters())
    assert any(parameter is head for parameter in trainable)
    assert len({id(p) for p in trainable}) == len(trainable)
    momentum = {id(p) for name in ("vision_model_momentum", "text_encoder_momentum")
                for p in getattr(model, name).parameters()}
    assert not momentum & {id(p) for p in trainable}
    assert all(not p.requires_grad for name in ("vision_proj_momentum", "text_proj_momentum")
               for p in getattr(model, name).parameters())


def test_task_models_round_trip():
    """Export to the retrieval and captioning models, then start pre-training from them
    (blipfast's and transformers' classes): the online weights come back exactly."""
    model = BlipForPreTraining(tiny_config(), queue_size=4)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.normal_()
    retrieval, captioning = model.to_retrieval_model(), model.to_captioning_model()
    expected = dict(model.state_dict())
    # the captioner keeps the LM label smoothing it was trained with (in its config, so
    # that save_pretrained and transformers keep it too), and the model's config is not
    # changed; lm_label_smoothing=0 exports 0
    assert captioning.text_decoder.label_smoothing == 0.1
    assert captioning.to_hf().text_decoder.label_smoothing == 0.1
    assert model.config.text_config.label_smoothing == 0.0
    unsmoothed = BlipForPreTraining(tiny_config(), queue_size=4, lm_label_smoothing=0.0)
    assert unsmoothed.to_captioning_model().text_decoder.label_smoothing == 0.0
    # the captioning model ties its word embeddings to the LM head: both hold the head's
    # matrix, as Salesforce's BLIP_Decoder does after loading a pre-training checkpoint
    head = expected["text_decoder.cls.predictions.decoder.weight"]
    assert not torch.equal(head, expected["text_encoder.embeddings.word_embeddings.weight"])
    for task_model in (retrieval, captioning):
        for key, value in task_model.state_dict().items():
            wanted = head if key == "text_decoder.bert.embeddings.word_embeddings.weight" \
                else expected[key]
            assert torch.equal(value, wanted), key
    for rebuilt in (BlipForPreTraining.from_task_models(retrieval, captioning, queue_size=4),
                    BlipForPreTraining.from_task_models(retrieval.to_hf(), captioning.to_hf(),
                                                        queue_size=4)):
        state = rebuilt.state_dict()
        for key, value in model.state_dict().items():
            if key.startswith(("queue.", "temp")):
                continue
            online_key = key.replace("_momentum", "")
            assert torch.equal(state[key], model.state_dict()[online_key]), key
    with pytest.raises(ValueError, match="captioning_model lacks"):
        BlipForPreTraining.from_task_models(retrieval, retrieval, queue_size=4)
    # without a captioning model the LM head starts as a copy of the word embeddings
    alone = BlipForPreTraining.from_task_models(retrieval, queue_size=4)
    alone_head = alone.text_decoder.cls.predictions.decoder.weight
    word_embeddings = alone.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(alone_head, word_embeddings)
    assert alone_head.data_ptr() != word_embeddings.data_ptr()
    # exported in the model's dtype
    model.double()
    for task_model in (model.to_retrieval_model(), model.to_captioning_model()):
        assert {parameter.dtype for parameter in task_model.parameters()} == {torch.float64}


def test_prepare_false_leaves_temperature_and_momentum_encoders_to_the_caller():
    """With prepare=False a training step neither clamps the temperature nor moves the
    momentum encoders (FSDP users call prepare_step themselves), but still enqueues."""
    model = BlipForPreTraining(tiny_config(), queue_size=4).train()
    with torch.no_grad():
        model.temp.fill_(0.9)  # above the clamp range
        for parameter in model.vision_proj.parameters():
            parameter.add_(1.0)  # online and momentum differ: an update would show
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    model(pixel_values, input_ids, attention_mask, prepare=False)
    for key, value in model.state_dict().items():
        if not key.startswith("queue."):
            assert torch.equal(value, before[key]), key
    assert int(model.queue.pointer) == 3
    model.prepare_step()
    assert model.temp.item() == pytest.approx(0.5)
    assert not torch.equal(model.vision_proj_momentum.weight, before["vision_proj_momentum.weight"])


@pytest.mark.usefixtures("reference_path")
@pytest.mark.parametrize("outside, bound", [(0.9, 0.5), (1e-4, 0.001)], ids=["above", "below"])
def test_temperature_gets_its_gradient_at_and_beyond_the_clamp_bounds(outside, bound):
    """The step divides by the clamped temperature, and the temperature gets the gradient
    of dividing by it, as in BLIP (which clamps in place, then divides by temp): the same
    gradient at the bound and beyond it, never 0. A clamp in the autograd graph would give
    0 beyond the bound, and 0 at it too from torch 2.14 on (it passes the gradient at its
    bounds up to 2.13), which freezes a temperature that reached 0.5 for good."""
    gradients, losses = [], []
    for temperature in (outside, bound):
        torch.manual_seed(0)  # the same weights and queue
        model = BlipForPreTraining(tiny_config(), queue_size=4).train()
        with torch.no_grad():
            model.temp.fill_(temperature)
        pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
        output = model(pixel_values, input_ids, attention_mask, prepare=False,
                       generator=torch.Generator().manual_seed(0))
        output.loss_itc.backward()
        gradients.append(model.temp.grad.clone())
        losses.append(output.loss_itc.detach())
    assert torch.equal(losses[0], losses[1])  # the clamped value is the one used
    assert bool(gradients[1].abs().gt(0).all()), gradients
    assert torch.equal(gradients[0], gradients[1])


def test_hard_negatives_are_drawn_at_the_contrastive_temperature(monkeypatch):
    """The ITM negatives are drawn from the online features' similarities scaled by
    1 / temperature (the ITC logits), with the batch's image ids and the caller's
    generator."""
    from blipfast import ops

    model = BlipForPreTraining(tiny_config(), queue_size=4).eval()
    with torch.no_grad():
        model.temp.fill_(0.05)
    sampler, calls = ops.contrastive_loss_with_hard_negatives, []

    def spy(image_feat, text_feat, logit_scale, **options):
        calls.append((image_feat, text_feat, logit_scale, options))
        return sampler(image_feat, text_feat, logit_scale, **options)

    monkeypatch.setattr(ops, "contrastive_loss_with_hard_negatives", spy)
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    ids, generator = torch.tensor([4, 5, 4]), torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(pixel_values, input_ids, attention_mask, image_ids=ids, generator=generator)
        image_embeds = model.vision_model(pixel_values).last_hidden_state
        text_embeds = model.text_encoder(input_ids, attention_mask=attention_mask).last_hidden_state
    [(image_feat, text_feat, logit_scale, options)] = calls
    torch.testing.assert_close(image_feat, F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1))
    torch.testing.assert_close(text_feat, F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1))
    torch.testing.assert_close(logit_scale, torch.tensor([20.0]))
    assert torch.equal(options["image_ids"], ids) and options["generator"] is generator


def test_blip_pretrain_negatives_score_online_features_against_momentum_features(monkeypatch):
    """``matching_negatives="blip_pretrain"``: a text for each image is drawn from the online
    image's similarities to the momentum texts, an image for each text from the online
    text's similarities to the momentum images, at the contrastive temperature, with the
    batch's positives excluded and the caller's generator (the momentum encoders differ
    from the online ones here, so swapping either side would fail)."""
    from blipfast.train import pretraining

    model = BlipForPreTraining(tiny_config(), queue_size=4,
                               matching_negatives="blip_pretrain").eval()
    with torch.no_grad():
        model.temp.fill_(0.05)
        for projection in (model.vision_proj_momentum, model.text_proj_momentum):
            projection.weight.mul_(-1.5)
    draw, calls = pretraining._draw_with_weight_floor, []

    def spy(logits, excluded, generator):
        calls.append((logits, excluded, generator))
        return draw(logits, excluded, generator)

    monkeypatch.setattr(pretraining, "_draw_with_weight_floor", spy)
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    ids, generator = torch.tensor([4, 5, 4]), torch.Generator().manual_seed(1)
    with torch.no_grad():
        output = model(pixel_values, input_ids, attention_mask, image_ids=ids,
                       generator=generator)
        features = {}
        for suffix in ("", "_momentum"):
            image_embeds = getattr(model, "vision_model" + suffix)(pixel_values).last_hidden_state
            text_embeds = getattr(model, "text_encoder" + suffix)(
                input_ids, attention_mask=attention_mask).last_hidden_state
            features[suffix] = (
                F.normalize(getattr(model, "vision_proj" + suffix)(image_embeds[:, 0]), dim=-1),
                F.normalize(getattr(model, "text_proj" + suffix)(text_embeds[:, 0]), dim=-1))
    (image_feat, text_feat), (image_momentum, text_momentum) = features[""], features["_momentum"]
    assert (image_feat - image_momentum).abs().max() > 0.1  # the two sides differ
    [(image_to_text, excluded, first), (text_to_image, excluded_again, second)] = calls
    torch.testing.assert_close(image_to_text, 20.0 * image_feat @ text_momentum.T)
    torch.testing.assert_close(text_to_image, 20.0 * text_feat @ image_momentum.T)
    expected_excluded = torch.tensor([[True, False, True], [False, True, False],
                                      [True, False, True]])
    assert torch.equal(excluded, expected_excluded) and torch.equal(excluded_again,
                                                                    expected_excluded)
    assert first is generator and second is generator
    for negatives in (output.negative_text_index, output.negative_image_index):
        assert negatives.tolist()[1] in (0, 2) and negatives.tolist()[0] == 1 \
            and negatives.tolist()[2] == 1


def test_weight_floor_draws_follow_blip_pretrain_weights():
    """Chi-square goodness of fit of ``_draw_with_weight_floor`` against
    ``softmax(logits) + 1e-4`` with the excluded columns at 0, on rows where the floor is
    negligible, where it is about half the mass, and where it is nearly all of it; the
    same counts reject the weights without the floor. A CPU generator serves the draws
    (its own device), and a row with every column excluded gives -1."""
    from blipfast.train.pretraining import _draw_with_weight_floor

    columns, copies = 8, 4000
    generator = torch.Generator().manual_seed(7)
    prototypes = torch.randn(4, columns, generator=generator)
    # The excluded column of row 1 holds 0.9974 of the softmax (this seed): the floor,
    # 7 * 1e-4, is a fifth of the weights left; row 2's holds 1 - 1e-6: nearly uniform.
    prototypes[1, 1] += 9.0
    prototypes[2, 2] += 14.0
    excluded_prototypes = torch.zeros(4, columns, dtype=torch.bool)
    excluded_prototypes[torch.arange(4), torch.arange(4)] = True
    excluded_prototypes[3, 5] = True  # two columns excluded
    logits = prototypes.repeat(copies, 1)
    excluded = excluded_prototypes.repeat(copies, 1)
    drawn = _draw_with_weight_floor(logits, excluded, generator)
    assert drawn.dtype == torch.int64 and drawn.shape == (4 * copies,)
    assert not bool(excluded[torch.arange(len(drawn)), drawn].any()), "an excluded column"
    counts = torch.zeros(4, columns, dtype=torch.float64)
    counts.index_put_((torch.arange(4).repeat(copies), drawn),
                      torch.ones(len(drawn), dtype=torch.float64), accumulate=True)
    probabilities = torch.softmax(prototypes.double(), dim=1)
    for floor, should_fit in ((1e-4, True), (0.0, False)):
        weights = (probabilities + floor).masked_fill(excluded_prototypes, 0.0)
        expected = weights / weights.sum(1, keepdim=True) * copies
        kept = ~excluded_prototypes
        if should_fit:
            assert expected[kept].min() > 5, "test design: too few expected draws"
        statistic = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()
        degrees = int(kept.sum()) - 4
        p_value = float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                                statistic / 2))
        if should_fit:
            assert p_value > 1e-3, f"draws do not follow the weights (p = {p_value:.2e})"
        else:
            assert p_value < 1e-6, f"the floor went unnoticed (p = {p_value:.2e})"
    everything = torch.ones(2, columns, dtype=torch.bool)
    assert _draw_with_weight_floor(logits[:2], everything, generator).tolist() == [-1, -1]


def test_momentum_update_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    online = [torch.randn(3, 5, generator=generator), torch.randn(7, generator=generator)]
    copies = [torch.randn(3, 5, generator=generator), torch.randn(7, generator=generator)]
    expected = [0.995 * c + 0.005 * p for c, p in zip(copies, online)]
    momentum_update_(copies, online, 0.995)
    for actual, wanted in zip(copies, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="momentum must be"):
        momentum_update_(copies, online, 1.5)
    with pytest.raises(ValueError, match="momentum_parameters has 1"):
        momentum_update_(copies[:1], online, 0.9)
    with pytest.raises(ValueError, match=r"momentum_parameters\[0\] has shape \(2,\) but "
                                         r"parameters\[0\] has \(3,\)"):
        momentum_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)
    with pytest.raises(ValueError, match=r"momentum_parameters\[1\] has dtype torch.float32 but "
                                         r"parameters\[1\] has torch.bfloat16"):
        momentum_update_(copies, [online[0], online[1].bfloat16()], 0.9)
    with pytest.raises(ValueError, match=r"momentum_parameters\[0\] has device cpu but "
                                         r"parameters\[0\] has meta"):
        momentum_update_(copies[:1], [online[0].to("meta")], 0.9)
    for bad in (float("nan"), -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="momentum must be"):
            momentum_update_(copies, online, bad)
    for bad_copies, bad_online, words in ((None, online, "momentum_parameters must be a sequence"),
                                          (copies, torch.tensor(1.0), "parameters must be a sequence"),
                                          (copies, [online[0], 3.0], r"parameters\[1\] must be a tensor")):
        with pytest.raises(TypeError, match=words):
            momentum_update_(bad_copies, bad_online, 0.9)
    # the ends: 1 keeps the copies, 0 copies the online tensors
    before = [copy.clone() for copy in copies]
    momentum_update_(copies, online, 1.0)
    assert all(torch.equal(copy, kept) for copy, kept in zip(copies, before))
    momentum_update_(copies, online, 0)
    assert all(torch.equal(copy, source) for copy, source in zip(copies, online))


def test_training_resumes_exactly_from_a_checkpoint(reference_path):
    """Interrupted after a step and resumed from ``state_dict`` (plus the optimizer's and
    the negatives generator's state) in a fresh model, the next step gives the same losses
    and state as running on: the checkpoint holds the queue, its pointer and ids (the queue
    wraps in that step), the momentum encoders and the temperature. (The PyTorch reference
    path, for time: what the checkpoint holds does not depend on the kernels.)"""
    import io


    case = CASES["plain"]
    model, _ = _models(case)

    def step(model, optimizer, generator, step_index):
        pixel_values, input_ids, attention_mask, ids = _batch(case, step_index)
        output = model(pixel_values, input_ids, attention_mask, alpha=case["alpha"],
                       image_ids=ids, generator=generator)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        return torch.stack([output.loss_itc, output.loss_itm, output.loss_lm]).detach()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    step(model, optimizer, generator, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state()}, buffer)
    expected = step(model, optimizer, generator, 1)

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = BlipForPreTraining(tiny_config(), queue_size=case["queue_size"], momentum=0.9,
                                 encoder_token_id=case["encoder_token_id"]).train()
    resumed.load_state_dict(checkpoint["model"], strict=True)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_generator = torch.Generator()
    resumed_generator.set_state(checkpoint["generator"])
    assert int(checkpoint["model"]["queue.pointer"]) == case["batch"]  # mid-queue
    torch.testing.assert_close(step(resumed, resumed_optimizer, resumed_generator, 1), expected,
                               rtol=0, atol=0)
    for (key, value), resumed_value in zip(model.state_dict().items(),
                                           resumed.state_dict().values()):
        assert torch.equal(value, resumed_value), key


def test_a_model_cast_to_bfloat16_or_float64_trains(monkeypatch):
    """Pure bfloat16 training (``model.bfloat16()``, no autocast): the cast also turns the
    feature queue's buffers to bfloat16 while the contrastive features stay float32; the
    step reads the queue in float32 and its losses are within the tolerance table's bf16
    bound (tests/tolerances.py) of the float32 model's, with finite
    gradients, and it enqueues into the bfloat16 queue. So too for ``model.double()``
    (its layers run the references, with a warning). The bf16 model runs the kernels (on
    CPU through the interpreter, its bf16 made a GPU's: interpreter_like_gpu.py); the
    float32 model and PyTorch's bf16 yardstick run the references, on the hard negatives
    the kernels drew (the reference sampler draws others: the ITM losses would differ by
    their pairs, not by precision).
    """
    from blipfast import reference
    from blipfast.kernels._runtime import interpreter_enabled

    interpreter_at_start = interpreter_enabled()
    case = CASES["plain"]
    pixel_values, input_ids, attention_mask, ids = _batch(case, 0)
    losses = {}
    # (dtype, kernels); a CUDA machine's CPU tensors take the references either way.
    for dtype, kernels in ((torch.bfloat16, True), (torch.float32, False),
                           (torch.bfloat16, False), (torch.float64, False)):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if kernels and interpreter_at_start else "0")
        model, _ = _models(case)
        model.to(dtype)
        output = model(pixel_values.to(dtype), input_ids, attention_mask, alpha=case["alpha"],
                       generator=torch.Generator().manual_seed(0))
        output.loss.backward()
        assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters()
                   if parameter.grad is not None)
        assert model.queue.image_features.dtype == dtype and int(model.queue.pointer) == case["batch"]
        losses[dtype, kernels] = torch.stack(
            [output.loss_itc, output.loss_itm, output.loss_lm]).detach().double()
        if kernels:
            drawn = (output.negative_text_index, output.negative_image_index)
            monkeypatch.setattr(reference, "sample_hard_negatives",
                                lambda *args, **kwargs: drawn)
    exact = losses[torch.float32, False]
    for index, name in enumerate(("loss_itc", "loss_itm", "loss_lm")):
        assert_close_to_reference(name, losses[torch.bfloat16, True][index],
                                  losses[torch.bfloat16, False][index], exact[index],
                                  compute_dtype=torch.bfloat16)
    torch.testing.assert_close(losses[torch.float64, False], exact, rtol=1e-5, atol=0)


def test_momentum_update_compiles_with_dynamic_shapes():
    """momentum_update_ in one graph under torch.compile(dynamic=True), where the momentum
    is a symbolic float its argument check must trace."""
    generator = torch.Generator().manual_seed(1)
    online = [torch.randn(3, 5, generator=generator), torch.randn(7, generator=generator)]
    copies = [torch.randn(3, 5, generator=generator), torch.randn(7, generator=generator)]
    expected = [0.9 * c + 0.1 * p for c, p in zip(copies, online)]
    torch._dynamo.reset()
    compiled = torch.compile(momentum_update_, backend="aot_eager", fullgraph=True, dynamic=True)
    compiled(copies, online, 0.9)
    for actual, wanted in zip(copies, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-7)


def test_feature_queue_wraps_and_keeps_the_newest_rows():
    queue = FeatureQueue(4, 2)
    rows = torch.arange(12, dtype=torch.float32).view(6, 2)
    queue.enqueue(rows[:3], -rows[:3], torch.tensor([0, 1, 2]))
    queue.enqueue(rows[3:5], -rows[3:5])  # wraps: slots 3, 0
    assert queue.image_features.tolist() == [rows[4].tolist(), rows[1].tolist(),
                                             rows[2].tolist(), rows[3].tolist()]
    assert torch.equal(queue.text_features, -queue.image_features)
    assert queue.image_ids.tolist() == [-1, 1, 2, -1] and int(queue.pointer) == 1
    queue.enqueue(torch.cat([rows, rows[:1]]), torch.cat([rows, rows[:1]]))  # 7 rows > 4 slots
    # rows k = 0..6 go to slots (1 + k) % 4; the last four (k = 3..6) survive
    assert queue.image_features.tolist() == [rows[3].tolist(), rows[4].tolist(),
                                             rows[5].tolist(), rows[0].tolist()]
    assert int(queue.pointer) == 0
    for size, dim, argument in ((0, 2, "size"), (True, 2, "size"), (2.0, 2, "size"),
                                (4, 0, "dim"), (4, True, "dim")):
        with pytest.raises(ValueError, match=f"{argument} must be a positive int"):
            FeatureQueue(size, dim)
    with pytest.raises(ValueError, match="image_feat must have shape"):
        queue.enqueue(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="text_feat must have shape"):
        queue.enqueue(rows[:2], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="text_feat has 3 rows but image_feat has 2"):
        queue.enqueue(rows[:2], rows[:3])
    with pytest.raises(ValueError, match="image_ids must have shape"):
        queue.enqueue(rows[:2], rows[:2], torch.tensor([1]))
    for image_feat, text_feat, image_ids, argument in (
            (rows[:2].tolist(), rows[:2], None, "image_feat"),
            (rows[:2], None, None, "text_feat"),
            (rows[:2], rows[:2].long(), None, "text_feat"),
            (rows[:2], rows[:2], [1, 2], "image_ids"),
            (rows[:2], rows[:2], torch.tensor([1.0, 2.0]), "image_ids"),
            (rows[:2], rows[:2], torch.tensor([1, 2], dtype=torch.uint8), "image_ids")):
        with pytest.raises(TypeError, match=f"enqueue: {argument} must"):
            queue.enqueue(image_feat, text_feat, image_ids)
    with pytest.raises(ValueError, match="image_ids is on meta but image_feat is on cpu"):
        queue.enqueue(rows[:2], rows[:2], torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match="text_feat is on meta but image_feat is on cpu"):
        queue.enqueue(rows[:2], rows[:2].to("meta"))
    queue.enqueue(rows[:2], rows[:2], torch.tensor([5, 6], dtype=torch.int32))
    assert queue.image_ids.dtype == torch.int64 and queue.image_ids[:2].tolist() == [5, 6]


def test_feature_queue_starts_with_random_unit_vectors_without_ids():
    """As BLIP: random unit vectors, from the caller's generator, that no image id matches."""
    queue = FeatureQueue(5, 3, generator=torch.Generator().manual_seed(0))
    again = FeatureQueue(5, 3, generator=torch.Generator().manual_seed(0))
    for features in (queue.image_features, queue.text_features):
        assert features.shape == (5, 3) and features.dtype == torch.float32
        torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert not torch.equal(queue.image_features, queue.text_features)
    assert torch.equal(queue.image_features, again.image_features)
    assert torch.equal(queue.text_features, again.text_features)
    assert queue.image_ids.tolist() == [-1] * 5 and int(queue.pointer) == 0
    assert set(queue.state_dict()) == {"image_features", "text_features", "image_ids", "pointer"}


def test_ramped_alpha():
    assert ramped_alpha(0, 10) == 0.0
    assert ramped_alpha(5, 10) == pytest.approx(0.2)
    assert ramped_alpha(25, 10) == pytest.approx(0.4)
    assert ramped_alpha(3, 6, alpha=0.3) == pytest.approx(0.15)
    for arguments, message in (((-1, 10), "step"), ((1, 0), "ramp_steps"), ((1, 10, 2.0), "alpha"),
                               ((1, 10, float("nan")), "alpha"),
                               ((torch.tensor(-1), 10), "step")):
        with pytest.raises(ValueError, match=message):
            ramped_alpha(*arguments)
    # NumPy integers and 0-dim integer tensors are integers; bools and floats are not.
    assert ramped_alpha(np.int64(5), np.int32(10)) == pytest.approx(0.2)
    assert ramped_alpha(torch.tensor(5), torch.tensor(10, dtype=torch.int32)) == pytest.approx(0.2)
    assert ramped_alpha(5, 10, alpha=np.float32(0.3)) == pytest.approx(0.15)
    assert type(ramped_alpha(5, 10, alpha=1)) is float
    for arguments, message in (
            ((True, 10), "step must be an int .*, got bool"),
            ((3.0, 10), "step must be an int .*, got float"),
            ((torch.tensor(3.0), 10), r"step must be an int .*, got a tensor of torch.float32 and "
                                      r"shape \(\)"),
            ((torch.tensor([3]), 10), r"step must be an int .*, got a tensor of torch.int64 and "
                                      r"shape \(1,\)"),
            ((torch.tensor(True), 10), "step must be an int"),
            ((3, np.bool_(True)), "ramp_steps must be an int"),
            ((3, 10, "0.4"), "alpha must be a real number, got str"),
            ((3, 10, True), "alpha must be a real number, got bool")):
        with pytest.raises(TypeError, match=message):
            ramped_alpha(*arguments)


def test_readme_ramps_alpha_over_the_global_step():
    """The README's training loop passes ramped_alpha the step counted across epochs, so
    alpha ramps over the first two epochs and then stays at its full value, as salesforce
    BLIP's pretrain.py: ``alpha * min(1, (epoch * len(loader) + i) / (2 * len(loader)))``.
    (The step within an epoch would restart the ramp every epoch.)"""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Pre-training\n", 1)[1].split("\n## ", 1)[0]
    [call] = [match.start() for match in re.finditer(r"ramped_alpha\(", section)]
    depth, end = 0, call
    for end in range(call + len("ramped_alpha"), len(section)):  # to the matching ")"
        depth += {"(": 1, ")": -1}.get(section[end], 0)
        if depth == 0:
            break
    arguments = section[call + len("ramped_alpha("):end]
    loader = range(5)
    documented, blip = [], []
    for epoch in range(4):
        for step, _ in enumerate(loader):
            documented.append(eval(f"ramped_alpha({arguments})",  # noqa: S307 (the README's)
                                   {"ramped_alpha": ramped_alpha, "epoch": epoch, "step": step,
                                    "loader": loader}))
            blip.append(0.4 * min(1, (epoch * len(loader) + step) / (2 * len(loader))))
    assert documented == pytest.approx(blip)
    assert documented[-len(loader):] == pytest.approx([0.4] * len(loader))


def test_argument_errors_name_the_argument():
    config = tiny_config()
    with pytest.raises(TypeError, match="config must be"):
        BlipForPreTraining(config.text_config)
    with pytest.raises(ValueError, match="momentum"):
        BlipForPreTraining(config, momentum=1.2)
    with pytest.raises(ValueError, match="lm_label_smoothing"):
        BlipForPreTraining(config, lm_label_smoothing=1.0)
    with pytest.raises(ValueError, match="encoder_token_id"):
        BlipForPreTraining(config, encoder_token_id=config.text_config.vocab_size)
    # a float would be truncated where it replaces the first token, a bool taken for 0 or 1
    for encoder_token_id in (5.5, True, "5"):
        with pytest.raises(TypeError, match="encoder_token_id must be an int or None"):
            BlipForPreTraining(config, encoder_token_id=encoder_token_id)
    for lm_label_smoothing in (None, "0.1", True):
        with pytest.raises(TypeError, match="lm_label_smoothing must be a real number"):
            BlipForPreTraining(config, lm_label_smoothing=lm_label_smoothing)
    with pytest.raises(ValueError, match="lm_label_smoothing"):
        BlipForPreTraining(config, lm_label_smoothing=float("nan"))
    with pytest.raises(ValueError, match="queue_size"):
        BlipForPreTraining(config, queue_size=0)
    with pytest.raises(ValueError, match="matching_negatives must be one of"):
        BlipForPreTraining(config, matching_negatives="momentum")
    with pytest.raises(TypeError, match="matching_negatives must be a str"):
        BlipForPreTraining(config, matching_negatives=None)
    numpy_integers = BlipForPreTraining(config, queue_size=np.int64(4),
                                        encoder_token_id=np.int64(5))
    assert type(numpy_integers.encoder_token_id) is int and numpy_integers.encoder_token_id == 5
    assert numpy_integers.queue.size == 4 and type(numpy_integers.queue.size) is int
    model = BlipForPreTraining(config, queue_size=4)
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    for arguments, message in (
            ((pixel_values[0], input_ids, attention_mask), "pixel_values"),
            ((pixel_values, input_ids.float(), attention_mask), "input_ids"),
            ((pixel_values, input_ids[:2], attention_mask[:2]), "input_ids has 2 rows"),
            ((pixel_values, input_ids, attention_mask[:, :3]), "attention_mask")):
        with pytest.raises(ValueError, match=message):
            model(*arguments)
    with pytest.raises(ValueError, match=r"image_ids must have shape \(B,\) = \(3,\), got \(2,\)"):
        model(pixel_values, input_ids, attention_mask, image_ids=torch.tensor([1, 2]))
    for image_ids in (torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1., 2., 3.])):
        with pytest.raises(TypeError, match="image_ids must have dtype int32 or int64"):
            model(pixel_values, input_ids, attention_mask, image_ids=image_ids)
    with pytest.raises(TypeError, match="image_ids must be an integer tensor or None, got list"):
        model(pixel_values, input_ids, attention_mask, image_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="image_ids is on meta but pixel_values is on cpu"):
        model(pixel_values, input_ids, attention_mask,
              image_ids=torch.tensor([1, 2, 3], device="meta"))
    with pytest.raises(TypeError, match="attention_mask must be a tensor or None"):
        model(pixel_values, input_ids, attention_mask.tolist())
    with pytest.raises(ValueError, match=r"pixel_values must have 3 channels, got shape "
                                         r"\(3, 1, 32, 32\)"):
        model(pixel_values[:, :1], input_ids, attention_mask)
    for alpha in (2.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha must lie in"):
            model(pixel_values, input_ids, attention_mask, alpha=alpha)
    for alpha in ("0.4", None, True, torch.tensor(0.4)):
        with pytest.raises(TypeError, match="alpha must be a real number"):
            model(pixel_values, input_ids, attention_mask, alpha=alpha)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        model(pixel_values, input_ids, attention_mask, generator=123)
    model.matching_negatives = "momentum"
    with pytest.raises(ValueError, match="matching_negatives must be one of"):
        model(pixel_values, input_ids, attention_mask)
    model.matching_negatives = "blip_retrieval"
    # a negative id would make the queue's entries without an id (-1) positives
    with pytest.raises(ValueError, match=r"image_ids must be non-negative .*, got values "
                                         r"from -1 to 1"):
        model(pixel_values, input_ids, attention_mask, image_ids=torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match="image_ids must be non-negative .*, got values from -1 to 3"):
        model.queue.enqueue(torch.randn(2, model.queue.image_features.shape[1]),
                            torch.randn(2, model.queue.image_features.shape[1]),
                            torch.tensor([3, -1]))
    assert int(model.queue.pointer) == 0


@pytest.mark.usefixtures("reference_path")
def test_a_rejected_step_leaves_the_state_unchanged():
    """A training step that raises changes nothing, bit for bit: no temperature clamp, no
    momentum update, no enqueueing (queue, ids and pointer). The arguments are checked
    before anything changes, and a failure only the online pass finds (a token id outside
    the vocabulary) comes before the state changes too."""
    model = BlipForPreTraining(tiny_config(), queue_size=4, momentum=0.9).train()
    with torch.no_grad():
        model.temp.fill_(0.9)  # above the clamp range: a clamp would show
        for parameter in model.trainable_parameters():
            parameter.add_(0.01)  # online and momentum differ: an update would show
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    outside_vocabulary = input_ids.clone()
    outside_vocabulary[1, 2] = model.config.text_config.vocab_size
    calls = (
        (ValueError, dict(alpha=2.0)),
        (ValueError, dict(alpha=float("nan"))),
        (TypeError, dict(alpha="0.4")),
        (TypeError, dict(generator=123)),
        (ValueError, dict(pixel_values=pixel_values[:, :2])),
        (ValueError, dict(image_ids=torch.tensor([1, 2]))),
        (IndexError, dict(input_ids=outside_vocabulary)))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for error, arguments in calls:
        arguments = dict(dict(pixel_values=pixel_values, input_ids=input_ids,
                              attention_mask=attention_mask), **arguments)
        with pytest.raises(error):
            model(**arguments)
        changed = [key for key, value in model.state_dict().items()
                   if not torch.equal(value, before[key])]
        assert not changed, f"{sorted(set(arguments) - {'attention_mask'})}: {changed[:5]}"
    text_config = model.config.text_config
    for name, value in (("bos_token_id", None), ("pad_token_id", text_config.vocab_size)):
        kept = getattr(text_config, name)
        setattr(text_config, name, value)  # as from_salesforce infers for a small vocabulary
        with pytest.raises(ValueError, match=f"config.text_config.{name} must be a token id"):
            model(pixel_values, input_ids, attention_mask)
        setattr(text_config, name, kept)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    # A step that goes through changes all three, so the comparison above would see them.
    model(pixel_values, input_ids, attention_mask)
    state = model.state_dict()
    for key in ("temp", "vision_proj_momentum.weight", "text_encoder_momentum.embeddings."
                "word_embeddings.weight", "queue.image_features", "queue.pointer"):
        assert not torch.equal(state[key], before[key]), key


@pytest.mark.usefixtures("reference_path")
def test_a_momentum_update_in_half_precision_warns():
    """Cast whole to bfloat16, the momentum update rounds away (a step of 0.5 % of a 5 %
    gap is under half a bfloat16 unit in the last place): momentum_update_ says so, through
    the model's update and the step; float32 does not warn, nor does copying (momentum 0)
    or keeping (momentum 1) the online weights."""
    model = BlipForPreTraining(tiny_config(), queue_size=4, momentum=0.995).train()
    model.bfloat16()
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.mul_(1.05)
    momentum_copy = model.text_proj_momentum.weight.clone()
    with pytest.warns(UserWarning, match=r"momentum copies are torch.bfloat16\. .*moves each "
                                         r"weight by 0\.005 .*rounds away.*torch.autocast"):
        model.momentum_update()
    assert torch.equal(model.text_proj_momentum.weight, momentum_copy)  # what it warns of
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    with pytest.warns(UserWarning, match="momentum copies are torch.bfloat16"):
        model(pixel_values.bfloat16(), input_ids, attention_mask)
    with pytest.warns(UserWarning, match="momentum copies are torch.float16"):
        momentum_update_([torch.ones(3, dtype=torch.float16)],
                         [torch.full((3,), 1.05, dtype=torch.float16)], 0.995)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.reset_momentum_encoders()  # momentum 0: an exact copy
        momentum_update_([torch.ones(3, dtype=torch.bfloat16)],
                         [torch.full((3,), 2.0, dtype=torch.bfloat16)], 1.0)
        full_precision = BlipForPreTraining(tiny_config(), queue_size=4, momentum=0.995).train()
        full_precision.momentum_update()
        full_precision(pixel_values, input_ids, attention_mask)


def test_attention_dropout_error_names_the_configs_that_use_none():
    """Attention dropout is refused in training; the message says which configs have none
    (transformers'), not that BLIP's all do (Salesforce's text config has 0.1)."""
    model = BlipForPreTraining(tiny_config(attention_probs_dropout_prob=0.1), queue_size=4).train()
    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    with pytest.raises(NotImplementedError, match=r"attention dropout \(0.1\).*transformers' BLIP "
                                                  r"configs.*Salesforce BLIP's own text config "
                                                  r"trains with attention_probs_dropout_prob 0.1"):
        model(pixel_values, input_ids, attention_mask)


def _salesforce_pretraining_checkpoint(model: BlipForPreTraining) -> dict:
    """``model``'s state in Salesforce BLIP_Pretrain's layout, written independently of
    ``to_salesforce``: through the task models and the task-model converters (whose key
    mapping tests/test_salesforce_checkpoint.py checks)."""
    from blipfast.models.blip.salesforce_checkpoint import transformers_to_salesforce

    state = transformers_to_salesforce(model.to_retrieval_model().state_dict(), "retrieval")
    state.update(transformers_to_salesforce(model.to_captioning_model().state_dict(),
                                            "captioning"))
    # BLIP_Pretrain's decoder holds the encoder's word embeddings (tie_encoder_decoder_weights)
    # and its LM head a matrix of its own
    state["text_decoder.bert.embeddings.word_embeddings.weight"] = \
        state["text_encoder.embeddings.word_embeddings.weight"]
    state["text_decoder.cls.predictions.decoder.weight"] = \
        model.text_decoder.cls.predictions.decoder.weight.detach().clone()
    momentum = {f"{online}.{key}": value
                for online in ("vision_model", "vision_proj", "text_encoder", "text_proj")
                for key, value in getattr(model, f"{online}_momentum").state_dict().items()}
    momentum.update({f"itm_head.{key}": value for key, value in model.itm_head.state_dict().items()})
    for key, value in transformers_to_salesforce(momentum, "retrieval").items():
        module, rest = key.split(".", 1)
        if module != "itm_head":
            state[f"{module}_m.{rest}"] = value
    state["image_queue"] = model.queue.image_features.t().clone()
    state["text_queue"] = model.queue.text_features.t().clone()
    state["queue_ptr"] = model.queue.pointer.view(1).clone()
    state["temp"] = model.temp.detach().view(()).clone()
    return {"model": state}


def test_salesforce_pretraining_checkpoint_loads():
    model = BlipForPreTraining(tiny_config(), queue_size=5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()  # momentum copies differ from the online modules too
        model.queue.enqueue(torch.randn(3, 16), torch.randn(3, 16))
    checkpoint = _salesforce_pretraining_checkpoint(model)
    assert any(key.startswith("text_encoder_m.encoder.layer.0.crossattention")
               for key in checkpoint["model"])
    heads = dict(vision_num_attention_heads=2, text_num_attention_heads=2)
    loaded = BlipForPreTraining.from_salesforce(checkpoint, **heads)
    assert loaded.config.text_config.num_attention_heads == 2
    assert loaded.queue.size == 5
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key

    tampered = {"model": dict(checkpoint["model"])}
    key = "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    tampered["model"][key] = tampered["model"][key] + 1.0
    with pytest.raises(ValueError, match="differs|differ in the checkpoint"):
        BlipForPreTraining.from_salesforce(tampered, **heads)
    with pytest.raises(ValueError, match="queue_size is the size of the checkpoint's queues"):
        BlipForPreTraining.from_salesforce(checkpoint, queue_size=8, **heads)
    incomplete = {"model": {k: v for k, v in checkpoint["model"].items() if k != "temp"}}
    with pytest.raises(ValueError, match="not a pre-training checkpoint"):
        BlipForPreTraining.from_salesforce(incomplete, **heads)
    # a tensor of another size is named as in the checkpoint, also a shared one (which
    # would otherwise be reported as two copies that differ) and a momentum encoder's
    for key, model_key in (
            ("text_decoder.bert.encoder.layer.1.crossattention.self.query.weight",
             "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight"),
            ("visual_encoder_m.blocks.1.mlp.fc1.weight",
             "vision_model_momentum.encoder.layers.1.mlp.fc1.weight")):
        resized = {"model": dict(checkpoint["model"])}
        resized["model"][key] = torch.zeros(3, 5)
        shown = key if key == model_key else f"{key} (loaded as {model_key})"
        with pytest.raises(ValueError, match=re.escape(f"{shown} has shape (3, 5)")):
            BlipForPreTraining.from_salesforce(resized, **heads)


def test_load_state_dict_refuses_differing_copies_of_a_shared_tensor():
    """The text encoder and decoder share modules, so their tensors have two names in the
    state dict: one copy edited raises (strict or not) and loads nothing, where torch would
    silently keep one of the two; equal copies (NaN included), one name alone, or meta
    tensors load."""
    model = BlipForPreTraining(tiny_config(), queue_size=4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state = {key: value.clone() + 1 for key, value in before.items()}
    edited = "text_encoder.encoder.layer.0.intermediate.dense.weight"
    state[edited] += 1
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"text_decoder\.bert\.encoder\.layer\.0\."
                                               r"intermediate\.dense\.weight and " + edited):
            model.load_state_dict(state, strict=strict)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    del state["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"]
    model.load_state_dict(state, strict=False)
    assert torch.equal(model.state_dict()[edited], state[edited])
    model.load_state_dict(before)
    with torch.no_grad():  # a diverged model's NaN is equal to itself
        model.state_dict()[edited][0, 0] = float("nan")
    model.load_state_dict({key: value.clone() for key, value in model.state_dict().items()})
    with torch.device("meta"):  # nothing to compare
        on_meta = BlipForPreTraining(tiny_config(), queue_size=4)
    on_meta.load_state_dict(on_meta.state_dict(), assign=True)


def test_to_salesforce_round_trip(tmp_path):
    model = BlipForPreTraining(tiny_config(), queue_size=5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
        model.queue.enqueue(torch.randn(3, 16), torch.randn(3, 16), torch.tensor([4, 0, 9]))
    with pytest.warns(UserWarning, match="queue holds image ids, which this state dict leaves "
                                         "out .* queue_image_ids=True"):
        state = model.to_salesforce()
    independent = _salesforce_pretraining_checkpoint(model)["model"]
    # exactly BLIP_Pretrain's keys: pretrain.py resumes with a strict load_state_dict
    assert sorted(state) == sorted(independent)
    for key, value in independent.items():
        assert value.shape == state[key].shape and torch.equal(value, state[key]), key
    assert state["temp"].dim() == 0 and state["queue_ptr"].shape == (1,)
    # a tensor BLIP's modules share is one tensor here too, so torch.save writes it once
    for name in ("embeddings.word_embeddings.weight",
                 "encoder.layer.1.crossattention.self.key.weight",
                 "encoder.layer.0.intermediate.dense.bias"):
        assert state[f"text_decoder.bert.{name}"] is state[f"text_encoder.{name}"], name
    assert state["text_decoder.cls.predictions.decoder.bias"] is \
        state["text_decoder.cls.predictions.bias"]
    with_ids = model.to_salesforce(queue_image_ids=True)
    assert sorted(with_ids) == sorted([*independent, "idx_queue"])
    assert with_ids["idx_queue"].tolist() == [[4, 0, 9, -1, -1]]
    assert all(not value.requires_grad for value in state.values())
    own_storage = {tensor.untyped_storage().data_ptr() for tensor in model.state_dict().values()}
    assert not any(value.untyped_storage().data_ptr() in own_storage for value in state.values())

    heads = dict(vision_num_attention_heads=2, text_num_attention_heads=2)
    expected = model.state_dict()
    for written, ids in ((with_ids, expected["queue.image_ids"]),
                         (state, torch.full((5,), -1))):  # without idx_queue: no ids
        path = tmp_path / "model_base.pth"
        torch.save({"model": written}, path)
        loaded = BlipForPreTraining.from_salesforce(path, **heads)
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, ids if key == "queue.image_ids" else expected[key]), key


def test_salesforce_checkpoints_resume_with_blip_pretrain_behaviour():
    """from_salesforce defaults to what blip_pretrain.py does where the constructor's
    defaults differ: its ITM negatives, and (with BLIP's tokenizer's vocabulary of 30524)
    [ENC] = 30523 as the first token of ITM texts; given options win."""
    heads = dict(vision_num_attention_heads=2, text_num_attention_heads=2)
    small = BlipForPreTraining(tiny_config(), queue_size=2).to_salesforce()
    loaded = BlipForPreTraining.from_salesforce(small, **heads)
    assert loaded.matching_negatives == "blip_pretrain" and loaded.encoder_token_id is None
    blip_vocabulary = BlipForPreTraining(tiny_config(vocab_size=30524), queue_size=2)
    state = blip_vocabulary.to_salesforce()
    loaded = BlipForPreTraining.from_salesforce(state, **heads)
    assert loaded.encoder_token_id == 30523
    loaded = BlipForPreTraining.from_salesforce(state, encoder_token_id=None,
                                                matching_negatives="blip_retrieval", **heads)
    assert loaded.encoder_token_id is None and loaded.matching_negatives == "blip_retrieval"


def test_itm_and_lm_share_the_cross_attention_keys_and_values(monkeypatch):
    """The ITM encoder and the LM decoder share their cross-attention layers and attend the
    same image states: each layer projects the image keys once per step (not once per
    pass), with the losses and gradients of projecting them twice."""
    from blipfast.models.blip import text

    models = [_models(CASES["plain"])[0] for _ in range(2)]  # the forward updates the queue
    key_weights = {id(layer.crossattention.self.key.weight)
                   for model in models for layer in model.text_encoder.encoder.layer}
    linear = F.linear
    projections = []

    def counting_linear(x, weight, bias=None):
        if id(weight) in key_weights:
            projections.append(weight)
        return linear(x, weight, bias)

    pixel_values, input_ids, attention_mask, _ = _batch(CASES["plain"], 0)
    results = []
    for model, share in zip(models, (True, False)):
        if not share:
            monkeypatch.setattr(text._SHARED_KEYS_VALUES, "lookup", lambda *args: None)
        with monkeypatch.context() as patch:
            patch.setattr(F, "linear", counting_linear)
            projections.clear()
            output = model(pixel_values, input_ids, attention_mask, alpha=0.3,
                           generator=torch.Generator().manual_seed(0), prepare=False)
            calls = len(projections)
        output.loss.backward()
        results.append((calls, output.loss.detach(),
                        {name: parameter.grad.clone()
                         for name, parameter in model.named_parameters()
                         if parameter.grad is not None}))
    layers = len(models[0].text_encoder.encoder.layer)
    assert results[0][0] == layers and results[1][0] == 2 * layers
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=0)
    for name, gradient in results[1][2].items():
        scale = gradient.abs().max().item()
        if name.endswith(".key.bias"):
            # Exactly 0 but for rounding (a key bias shifts all of a query's scores
            # alike): what is left of sums that cancel, whose terms are of the order of
            # the key weight's gradient.
            scale = max(scale, results[1][2][name[:-len("bias")] + "weight"].abs().max().item())
        error = (results[0][2][name] - gradient).abs().max().item()
        assert error <= 1e-5 * scale, (name, error, scale)
