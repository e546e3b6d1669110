"""The contrastive loss across processes (gloo, CPU, Triton interpreter): uneven local
batches on 2 and 3 ranks; loss and every gradient against the single-process reference on
the concatenated batch, and against the all_gather reference run on the ranks; hard
negatives drawn with the same generator state on every rank are those a single process
draws on the concatenated batch."""

import pytest
import torch

import blipfast
from blipfast import reference
from distributed_harness import run_on_ranks

FEATURE_DIM = 16
NEGATIVES_SEED = 99  # the same generator state on every rank, as seeded training has
CASES = [
    dict(queries=0, repeated_ids=False, label_smoothing=0.0),
    dict(queries=3, repeated_ids=True, label_smoothing=0.1),
]


def _global_inputs(total: int, case: dict, case_index: int):
    generator = torch.Generator().manual_seed(1000 + case_index)
    shape = (total, case["queries"], FEATURE_DIM) if case["queries"] else (total, FEATURE_DIM)
    image = torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(total, FEATURE_DIM, generator=generator), dim=-1)
    ids = (torch.randint(0, max(1, total // 2), (total,), generator=generator)
           if case["repeated_ids"] else None)
    return image, text, ids


def _rank_run(rank, world_size, sizes):
    """Each rank: its slice of the global batch through blipfast and the reference."""
    offset, local = sum(sizes[:rank]), sizes[rank]
    results = []
    for case_index, case in enumerate(CASES):
        image, text, ids = _global_inputs(sum(sizes), case, case_index)
        local_ids = ids[offset:offset + local] if ids is not None else None
        options = dict(image_ids=local_ids, label_smoothing=case["label_smoothing"])
        per_impl = {}
        implementations = [("blipfast", blipfast.ops.contrastive_loss),
                           ("reference", reference.contrastive_loss)]
        if case_index == 0:
            # torch.compile around the gathering loss (the gather runs outside the graph)
            implementations.append(("compiled", torch.compile(blipfast.ops.contrastive_loss,
                                                              backend="aot_eager")))
        for name, function in implementations:
            leaves = [image[offset:offset + local].clone().requires_grad_(),
                      text[offset:offset + local].clone().requires_grad_(),
                      torch.tensor(7.0, requires_grad=True)]
            loss = function(*leaves, **options)
            grads = torch.autograd.grad(loss, leaves)
            per_impl[name] = (loss.detach(), *grads)
        negatives = blipfast.ops.contrastive_loss_with_hard_negatives(
            image[offset:offset + local], text[offset:offset + local], torch.tensor(7.0),
            generator=torch.Generator().manual_seed(NEGATIVES_SEED), **options)
        per_impl["negatives"] = (negatives.negative_text_index, negatives.negative_image_index)
        results.append(per_impl)
    return results


def _expected(sizes, case, case_index):
    """Single process, concatenated batch: rank r's loss is the mean of its rows' losses;
    its features' gradient is that of the sum of every rank's loss."""
    total = sum(sizes)
    image, text, ids = _global_inputs(total, case, case_index)
    ids = ids if ids is not None else torch.arange(total)
    leaves = [image.double().requires_grad_(), text.double().requires_grad_()]
    scales = [torch.tensor(7.0, dtype=torch.float64, requires_grad=True) for _ in sizes]
    losses, offset = [], 0
    for rank, size in enumerate(sizes):
        row_losses, column_losses = reference.score_matrix_cross_entropy(
            leaves[0], leaves[1], scales[rank], ids, ids,
            label_smoothing=case["label_smoothing"])
        rows = slice(offset, offset + size)
        losses.append(0.5 * (row_losses[rows].mean() + column_losses[rows].mean()))
        offset += size
    grads = torch.autograd.grad(sum(losses), leaves + scales)
    negatives = blipfast.ops.contrastive_loss_with_hard_negatives(
        image, text, torch.tensor(7.0), image_ids=ids, label_smoothing=case["label_smoothing"],
        generator=torch.Generator().manual_seed(NEGATIVES_SEED))
    return losses, grads[0], grads[1], grads[2:], ids, negatives


@pytest.mark.parametrize("sizes", [[3, 5], [2, 4, 1]], ids=lambda sizes: f"ranks{len(sizes)}")
@pytest.mark.interpreter
def test_matches_single_process_reference(sizes):
    results = run_on_ranks(len(sizes), _rank_run, sizes)
    for case_index, case in enumerate(CASES):
        losses, grad_image, grad_text, grad_scales, ids, negatives = _expected(
            sizes, case, case_index)
        offset = 0
        for rank, size in enumerate(sizes):
            rows = slice(offset, offset + size)
            got = results[rank][case_index]
            for name in ("blipfast", "reference") + (("compiled",) if case_index == 0 else ()):
                loss, image_grad, text_grad, scale_grad = got[name]
                where = f"case {case_index} rank {rank} {name}"
                torch.testing.assert_close(loss.double(), losses[rank].detach(), atol=2e-5,
                                           rtol=1e-5, msg=where + " loss")
                torch.testing.assert_close(image_grad.double(), grad_image[rows], atol=2e-6,
                                           rtol=1e-4, msg=where + " grad image")
                torch.testing.assert_close(text_grad.double(), grad_text[rows], atol=2e-6,
                                           rtol=1e-4, msg=where + " grad text")
                torch.testing.assert_close(scale_grad.double(), grad_scales[rank], atol=2e-6,
                                           rtol=1e-4, msg=where + " grad logit_scale")
            negative_texts, negative_images = got["negatives"]
            for drawn in (negative_texts, negative_images):
                assert ((drawn >= 0) & (drawn < sum(sizes))).all()
                assert (ids[drawn] != ids[rows]).all(), "a positive was drawn"
            # The noise is keyed on global indices: the same draws as one process makes.
            assert torch.equal(negative_texts, negatives.negative_text_index[rows]), \
                f"case {case_index} rank {rank}: negative texts differ from one process's"
            assert torch.equal(negative_images, negatives.negative_image_index[rows]), \
                f"case {case_index} rank {rank}: negative images differ from one process's"
            offset += size


def _disagreeing_rank(rank, world_size):
    """Each rank: the message every disagreement across ranks raises here (or "ran")."""
    generator = torch.Generator().manual_seed(rank)
    features = torch.nn.functional.normalize(torch.randn(3, FEATURE_DIM, generator=generator),
                                             dim=-1)
    scale = torch.tensor(5.0)
    scenarios = {
        # image_ids on rank 0 only: rank 0 would gather ids that rank 1 never sends
        "ids on one rank": dict(image_feat=features, text_feat=features,
                                image_ids=torch.arange(3) if rank == 0 else None),
        "an empty rank": dict(image_feat=features[:3 if rank == 0 else 0],
                              text_feat=features[:3 if rank == 0 else 0]),
        "dtypes": dict(image_feat=features.to(torch.float16 if rank else torch.float32),
                       text_feat=features.to(torch.float16 if rank else torch.float32)),
        "dims": dict(image_feat=features[:, None] if rank else features, text_feat=features),
        "agreeing": dict(image_feat=features, text_feat=features),
    }
    outcomes = {}
    for name, arguments in scenarios.items():
        for op in (blipfast.ops.contrastive_loss,
                   blipfast.ops.contrastive_loss_with_hard_negatives):
            try:
                op(logit_scale=scale, **arguments)
                outcomes[name, op.__name__] = "ran"
            except ValueError as error:
                outcomes[name, op.__name__] = str(error)
    return outcomes


@pytest.mark.interpreter
def test_ranks_that_disagree_all_raise():
    """What one rank cannot see alone (image_ids given on some ranks only, a rank without
    rows, another dtype or number of dims) raises a ValueError on every rank, after one
    exchange they all join; before, ranks waited in collectives the others never joined,
    or gloo aborted the process. The ranks stay in step: the next call runs."""
    first, second = run_on_ranks(2, _disagreeing_rank, timeout_s=240)
    expected = {"ids on one rank": "whether image_ids is given must be the same on every rank",
                "an empty rank": "rank 1 of the group has no image-text pairs",
                "dtypes": "same dtype and number of dims on every rank",
                "dims": "same dtype and number of dims on every rank"}
    for (name, op), message in first.items():
        assert op.startswith("contrastive_loss")
        if name == "agreeing":
            assert message == "ran" and second[name, op] == "ran"
            continue
        assert expected[name] in message and expected[name] in second[name, op], \
            (name, op, message, second[name, op])


def _reference_rank(rank, world_size):
    """The PyTorch reference path across ranks: in a subgroup of 2 of 3 ranks (the third
    does not call), and compiled with uneven (B, Q, D) batches; loss and gradients."""
    import torch.distributed as dist

    subgroup = dist.new_group([0, 2])
    sizes = [1, 3]
    results = {}
    if rank != 1:
        position = {0: 0, 2: 1}[rank]
        image, text, ids = _global_inputs(sum(sizes), CASES[1], 1)
        offset, local = sum(sizes[:position]), sizes[position]
        options = dict(image_ids=ids[offset:offset + local],
                       label_smoothing=CASES[1]["label_smoothing"], group=subgroup)
        for name, function in (("eager", reference.contrastive_loss),
                               ("compiled", torch.compile(reference.contrastive_loss,
                                                          backend="aot_eager"))):
            leaves = [image[offset:offset + local].clone().requires_grad_(),
                      text[offset:offset + local].clone().requires_grad_(),
                      torch.tensor(7.0, requires_grad=True)]
            loss = function(*leaves, **options)
            results[name] = (loss.detach(), *torch.autograd.grad(loss, leaves))
    dist.barrier()
    return results


@pytest.mark.interpreter
def test_reference_in_a_subgroup_and_compiled():
    """blipfast.reference.contrastive_loss (the CPU path without the interpreter): its
    backward in a subgroup (torch.distributed.nn.functional.all_gather's gloo backward
    fails there), and compiled with uneven batches (traced collectives of different
    shapes aborted gloo), against one process on the concatenated batch."""
    results = run_on_ranks(3, _reference_rank, timeout_s=240)
    sizes = [1, 3]
    losses, grad_image, grad_text, grad_scales, _, _ = _expected(sizes, CASES[1], 1)
    for position, rank in enumerate((0, 2)):
        rows = slice(sum(sizes[:position]), sum(sizes[:position + 1]))
        for name in ("eager", "compiled"):
            loss, image_grad, text_grad, scale_grad = results[rank][name]
            torch.testing.assert_close(loss.double(), losses[position].detach(), atol=2e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(image_grad.double(), grad_image[rows], atol=2e-6,
                                       rtol=1e-4)
            torch.testing.assert_close(text_grad.double(), grad_text[rows], atol=2e-6,
                                       rtol=1e-4)
            torch.testing.assert_close(scale_grad.double(), grad_scales[position], atol=2e-6,
                                       rtol=1e-4)
    assert results[1] == {}
