"""Hard-negative sampling (Gumbel-max in the tiled pass) against the materialized softmax.

Runs on CPU through the Triton interpreter, and on CUDA when present.
"""

import pytest
import torch

import blipfast
from blipfast import reference
from contrastive_cases import normalized

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _draw(image, text, scale, ids, seed):
    generator = torch.Generator(device=image.device.type).manual_seed(seed)
    return blipfast.ops.contrastive_loss_with_hard_negatives(
        image, text, scale, image_ids=ids, generator=generator)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("queries", [0, 3])
def test_positives_are_never_drawn(device, queries):
    generator = torch.Generator().manual_seed(11)
    batch = 45
    image = normalized(*((batch, queries, 32) if queries else (batch, 32)), generator=generator)
    text = normalized(batch, 32, generator=generator)
    ids = torch.randint(0, 15, (batch,), generator=generator)
    scale = torch.tensor(20.0)
    image, text, scale, ids = (t.to(device) for t in (image, text, scale, ids))
    for seed in range(3):
        out = _draw(image, text, scale, ids, seed)
        for negatives in (out.negative_text_index, out.negative_image_index):
            assert negatives.dtype == torch.int64 and negatives.shape == (batch,)
            assert ((negatives >= 0) & (negatives < batch)).all()
            assert (ids[negatives] != ids).all(), "a positive was drawn as a negative"


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_negatives_get_minus_one(device):
    image, text = normalized(6, 16).to(device), normalized(6, 16).to(device)
    ids = torch.tensor([4, 4, 4, 4, 4, 4], device=device)
    out = _draw(image, text, torch.tensor(5.0, device=device), ids, 0)
    assert (out.negative_text_index == -1).all() and (out.negative_image_index == -1).all()
    assert torch.isfinite(out.loss)


def test_draws_are_reproducible_and_independent_of_tiling():
    from blipfast.kernels.contrastive import contrastive_forward

    generator = torch.Generator().manual_seed(3)
    image, text = normalized(50, 32, generator=generator), normalized(50, 32, generator=generator)
    scale = torch.tensor(10.0)
    first = _draw(image, text, scale, None, 7)
    again = _draw(image, text, scale, None, 7)
    other = _draw(image, text, scale, None, 8)
    assert torch.equal(first.negative_text_index, again.negative_text_index)
    assert torch.equal(first.negative_image_index, again.negative_image_index)
    assert not torch.equal(first.negative_text_index, other.negative_text_index)

    ids = torch.arange(50)
    seed = torch.tensor([12345])
    draws = []
    for block_m, block_n in ((16, 16), (32, 16), (16, 32)):
        config = dict(BLOCK_Q=1, BLOCK_D=32, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                      num_stages=1)
        _, _, row_negatives, column_negatives = contrastive_forward(
            image, text, scale, ids, ids, seed=seed, config=config)
        draws.append((row_negatives, column_negatives))
    for row_negatives, column_negatives in draws[1:]:
        assert torch.equal(row_negatives, draws[0][0])
        assert torch.equal(column_negatives, draws[0][1])


def _chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor, degrees: int) -> float:
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                         statistic.double() / 2))


def test_draws_follow_the_materialized_softmax():
    """Chi-square goodness of fit of the drawn negatives' classes against the exact
    probabilities from the materialized softmax (positives excluded).

    Eight prototype pairs, each repeated ``copies`` times with one id per prototype: every
    row of a prototype samples from the same distribution over the other seven
    prototypes, so one call yields ``copies`` draws per prototype and direction.
    """
    prototypes, copies, calls = 8, 40, 4
    generator = torch.Generator().manual_seed(2024)
    image_prototypes = normalized(prototypes, 16, generator=generator)
    text_prototypes = normalized(prototypes, 16, generator=generator)
    classes = torch.arange(prototypes).repeat(copies)
    image, text = image_prototypes[classes], text_prototypes[classes]
    scale = torch.tensor(2.5)

    exact = reference.hard_negative_probabilities(image, text, scale, image_ids=classes)
    counts = [torch.zeros(prototypes, prototypes, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        for call in range(calls):
            out = _draw(image, text, scale, classes, 100 + call)
            for direction, negatives in enumerate((out.negative_text_index,
                                                   out.negative_image_index)):
                drawn = classes[negatives]
                counts[direction].index_put_((classes, drawn), torch.ones(len(drawn),
                                             dtype=torch.float64), accumulate=True)
    for direction in range(2):
        # Exact class probabilities for each prototype's rows (identical within a class).
        class_probability = torch.zeros(prototypes, prototypes, dtype=torch.float64)
        class_probability.index_add_(1, classes, exact[direction][:prototypes].double())
        observed = counts[direction]
        assert (observed.diagonal() == 0).all(), "a positive class was drawn"
        off_diagonal = ~torch.eye(prototypes, dtype=torch.bool)
        expected = class_probability * copies * calls
        assert expected[off_diagonal].min() > 5, "test design: too few expected draws"
        p_value = _chi_square_p_value(observed[off_diagonal], expected[off_diagonal],
                                      degrees=prototypes * (prototypes - 2))
        assert p_value > 1e-3, f"direction {direction}: draws do not follow the softmax " \
                               f"(chi-square p = {p_value:.2e})"
