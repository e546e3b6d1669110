"""Hard-negative sampling (Gumbel-max in the tiled pass) against the materialized softmax.

Runs on CPU through the Triton interpreter, and on CUDA when present (the tests of the
draws' distribution too).
"""

import pytest
import torch
import triton
import triton.language as tl

import blipfast
from blipfast import reference
from blipfast.kernels.contrastive import _gumbel_noise
from contrastive_cases import normalized
from kernel_devices import KERNEL_DEVICES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The tests of the kernels' draws themselves run on KERNEL_DEVICES (CPU tensors without
# the interpreter would test torch.multinomial's draws instead).


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


@pytest.mark.interpreter
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


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_draws_follow_the_materialized_softmax(device):
    """Chi-square goodness of fit of the drawn negatives' classes against the exact
    probabilities from the materialized softmax (positives excluded).

    Eight prototype pairs, each repeated ``copies`` times with one id per prototype: every
    row of a prototype samples from the same distribution over the other seven
    prototypes, so one call yields ``copies`` draws per prototype and direction.
    """
    prototypes, copies, calls = 8, 40, 6
    generator = torch.Generator().manual_seed(2024)
    image_prototypes = normalized(prototypes, 16, generator=generator)
    text_prototypes = normalized(prototypes, 16, generator=generator)
    classes = torch.arange(prototypes).repeat(copies)
    image, text = image_prototypes[classes], text_prototypes[classes]
    # Scale and draws that hold for any prototypes, not only these (60 prototype draws with
    # other seeds): every class expects over 5 draws (chi-square's rule; at 2.5 with 4
    # calls, 27 in 40 fell short), and uniform draws are rejected at p < 1e-6 (their
    # expected chi-square is at least 227 above the 48 degrees of freedom; 85 at 1.5 with
    # 4 calls, rejected at only p = 2e-4 once).
    scale = torch.tensor(2.0)

    exact = reference.hard_negative_probabilities(image, text, scale, image_ids=classes)
    counts = [torch.zeros(prototypes, prototypes, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        for call in range(calls):
            out = _draw(image.to(device), text.to(device), scale.to(device),
                        classes.to(device), 100 + call)
            for direction, negatives in enumerate((out.negative_text_index,
                                                   out.negative_image_index)):
                drawn = classes[negatives.cpu()]
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
        degrees = prototypes * (prototypes - 2)  # per row: its classes less one (fixed sum)
        p_value = _chi_square_p_value(observed[off_diagonal], expected[off_diagonal], degrees)
        assert p_value > 1e-3, f"direction {direction}: draws do not follow the softmax " \
                               f"(chi-square p = {p_value:.2e})"
        # The check above can fail: the same counts reject uniform draws over the negatives.
        uniform = torch.full_like(expected, copies * calls / (prototypes - 1))
        uniform_p_value = _chi_square_p_value(observed[off_diagonal], uniform[off_diagonal],
                                              degrees)
        assert uniform_p_value < 1e-6, f"direction {direction}: uniform p = {uniform_p_value:.2e}"


@pytest.mark.interpreter
def test_offsets_key_the_noise_and_shift_the_returned_indices():
    """A problem cut from a larger one with its global row and column offsets draws what
    the whole problem draws for the same (global row, global column) pairs, and returns
    global indices: how each rank's share of a gathered batch reproduces the
    single-process draws."""
    from blipfast.kernels.contrastive import contrastive_forward

    generator = torch.Generator().manual_seed(5)
    total, first, count = 40, 13, 11  # rows or columns [first, first + count) of 40
    image, text = (normalized(total, 16, generator=generator) for _ in range(2))
    ids = torch.arange(total)
    scale, seed = torch.tensor(4.0), torch.tensor([777])
    _, _, row_negatives, column_negatives = contrastive_forward(image, text, scale, ids, ids,
                                                                seed=seed)
    part = slice(first, first + count)
    # Some rows against all columns, and all rows against some columns.
    _, _, part_row_negatives, _ = contrastive_forward(
        image[part], text, scale, ids[part], ids, seed=seed, column_term=False,
        row_index_offset=first)
    _, _, _, part_column_negatives = contrastive_forward(
        image, text[part], scale, ids, ids[part], seed=seed, row_term=False,
        column_index_offset=first)
    assert torch.equal(part_row_negatives, row_negatives[part])
    assert torch.equal(part_column_negatives, column_negatives[part])
    # The other way round, the negatives themselves come from a slice: returned global.
    _, _, sliced_row_negatives, _ = contrastive_forward(
        image, text[part], scale, ids, ids[part], seed=seed, column_term=False,
        column_index_offset=first)
    _, _, _, sliced_column_negatives = contrastive_forward(
        image[part], text, scale, ids[part], ids, seed=seed, row_term=False,
        row_index_offset=first)
    for negatives in (sliced_row_negatives, sliced_column_negatives):
        assert ((negatives >= first) & (negatives < first + count)).all()
        assert (negatives != ids).all(), "a positive was drawn"
    # A row (or column) whose every candidate is a positive gets -1, offsets or not.
    same = torch.zeros(total, dtype=torch.int64)
    _, _, none_for_rows, none_for_columns = contrastive_forward(
        image[part], text[part], scale, same[part], same[part], seed=seed,
        row_index_offset=first, column_index_offset=first)
    assert none_for_rows.tolist() == [-1] * count
    assert none_for_columns.tolist() == [-1] * count


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_the_two_directions_draw_independently(device):
    """The negative text of image i and the negative image of text j are independent
    draws, as BLIP's two ``torch.multinomial`` calls are. Were both directions to share
    their noise, a pair (i, j) that one direction draws would tend to be drawn back by
    the other: count such mutual draws against their expectation under independence,
    sum_ij p(i -> j) p(j -> i) per call (a Poisson count)."""
    batch, calls = 64, 20
    generator = torch.Generator().manual_seed(9)
    image, text = (normalized(batch, 16, generator=generator) for _ in range(2))
    scale = torch.tensor(2.0)
    image_to_text, text_to_image = reference.hard_negative_probabilities(image, text, scale)
    expected = calls * float((image_to_text * text_to_image.t()).sum())
    rows = torch.arange(batch)
    mutual = 0
    with torch.no_grad():
        for call in range(calls):
            out = _draw(image.to(device), text.to(device), scale.to(device), None, 500 + call)
            negative_text, negative_image = (out.negative_text_index.cpu(),
                                             out.negative_image_index.cpu())
            drawn_back = negative_image[negative_text]
            mutual += int((drawn_back == rows).sum())
    # P(count >= mutual) for a Poisson count of mean ``expected``.
    p_value = float(torch.special.gammainc(
        torch.tensor(float(max(mutual, 1)), dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64)))
    assert p_value > 1e-4, (f"{mutual} mutual draws in {calls} calls, {expected:.2f} expected "
                            f"from independent directions (p = {p_value:.1e})")


@triton.jit
def _noise_kernel(seed_ptr, out_ptr, SIZE: tl.constexpr):
    """The hard-negative kernels' noise for the (row, column) pairs [0, SIZE)^2."""
    rows = tl.arange(0, SIZE)[:, None] + 0 * tl.arange(0, SIZE)[None, :]
    columns = tl.arange(0, SIZE)[None, :] + 0 * tl.arange(0, SIZE)[:, None]
    noise = _gumbel_noise(tl.load(seed_ptr), rows, columns, 0)
    tl.store(out_ptr + rows * SIZE + columns, noise)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_the_noise_is_standard_gumbel(device):
    """The Gumbel-max trick samples the softmax only with standard Gumbel noise: the
    kernels' noise for 64 x 64 (row, column) pairs against the Gumbel CDF
    exp(-exp(-x)) (Kolmogorov-Smirnov distance; at n = 4096 about 0.03 is the 0.1% level,
    while exponential noise, -log u, is 0.3 away)."""
    size = 64
    noise = torch.empty(size, size, device=device)
    _noise_kernel[(1,)](torch.tensor([2024], device=device), noise, SIZE=size)
    values = noise.flatten().cpu().double().sort().values
    assert torch.isfinite(values).all()
    gumbel_cdf = torch.exp(-torch.exp(-values))
    n = values.numel()
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum(steps - gumbel_cdf, gumbel_cdf - (steps - 1 / n)).max()
    assert distance < 0.03, f"Kolmogorov-Smirnov distance {float(distance):.3f} from Gumbel"
