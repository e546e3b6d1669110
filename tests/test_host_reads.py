"""No host synchronisation inside forward and backward: blipfast's BLIP models, the
pre-training step and transformers' BLIP models patched by blipfast never read a tensor's
value on the host (``.item()``, ``.tolist()``,
``bool(tensor)``, ``int(tensor)``, Python loops over values).

On a GPU each such read waits for every kernel queued before it; the GPU tests check that
with ``torch.cuda.set_sync_debug_mode("error")``, but they only run where there is a GPU.
Here, on CPU in CI, every value read is caught where it starts: in the dispatcher
(``aten._local_scalar_dense``, which all of those go through). The reads allowed are the
CPU branches of value checks (``_checks.check_values``: ``ops.attention``'s ``kv_index``
range, the language-model labels' range, the pre-training step's non-negative image ids):
on CUDA tensors those run on the device (``torch._assert_async``).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import blipfast
import blipfast.models as models
from blip_models import hf_model, images, text_batch, tiny_config
from blipfast.train import BlipForPreTraining

# (file name, function) of the host reads that only happen on CPU tensors.
CPU_ONLY_READS = {("_checks.py", "check_values")}


aten = torch.ops.aten
# Operators that make the host wait for the device: a value read, or an output whose shape
# depends on values (nonzero, masked_select, unique, bincount, repeat_interleave without
# output_size, and indexing with a boolean mask, read or write).
SYNCING_OPERATORS = {aten._local_scalar_dense.default, aten.nonzero.default,
                     aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                     aten.unique_consecutive.default, aten.bincount.default}
INDEXING_OPERATORS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                      aten._index_put_impl_.default}


def _syncs(func, args, kwargs) -> bool:
    if func in SYNCING_OPERATORS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in INDEXING_OPERATORS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
                   for index in indices)
    return False


def _origin():
    """The innermost frame of blipfast's code (``blipfast/`` or ``kernels/``) as (file name,
    function), or None when the read does not come from blipfast."""
    ours = [frame for frame in traceback.extract_stack()
            if "/blipfast/" in frame.filename or "/kernels/" in frame.filename]
    return (ours[-1].filename.rsplit("/", 1)[-1], ours[-1].name) if ours else None


class _SyncingOperators(TorchDispatchMode):
    def __init__(self, origins):
        super().__init__()
        self.origins = origins

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.origins.append(_origin())
        return func(*args, **kwargs)


class _HostConversions(TorchFunctionMode):
    """``.tolist()`` and ``.numpy()``, which read CPU tensors without the dispatcher."""

    def __init__(self, origins):
        super().__init__()
        self.origins = origins

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.origins.append(_origin())
        return func(*args, **(kwargs or {}))


class HostReads:
    """Context manager recording the origin (see ``_origin``) of every host read."""

    def __init__(self):
        self.origins: list[tuple[str, str] | None] = []
        self._modes = (_HostConversions(self.origins), _SyncingOperators(self.origins))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc_info):
        for mode in reversed(self._modes):
            mode.__exit__(*exc_info)


def _reads_outside_cpu_checks(run) -> list:
    with HostReads() as reads:
        run()
    return [origin for origin in reads.origins if origin not in CPU_ONLY_READS]


def _model(task: str, seed: int, patched: bool = False):
    """blipfast's model, or with ``patched`` transformers' model after ``blipfast.patch``."""
    model = hf_model(task, tiny_config(), seed)
    model = blipfast.patch(model) if patched else getattr(models, task).from_hf(model)
    return model.train()


def _captioning(patched: bool = False):
    model = _model("BlipForConditionalGeneration", 0, patched)
    generator = torch.Generator().manual_seed(0)
    ids, mask = text_batch(3, 9, generator, pad_last_from=6)
    labels = ids.masked_fill(mask == 0, -100)
    return lambda: model(pixel_values=images(3, generator), input_ids=ids, attention_mask=mask,
                         labels=labels).loss.backward()


def _retrieval(use_itm_head: bool, shared_images: bool = False, patched: bool = False):
    model = _model("BlipForImageTextRetrieval", 1, patched)
    generator = torch.Generator().manual_seed(1)
    ids, mask = text_batch(4, 8, generator, pad_last_from=3)
    pixels = images(2 if shared_images else 4, generator)
    extra = dict(image_index=torch.tensor([1, 0, 1, 1])) if shared_images else {}

    def run():
        output = model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                       use_itm_head=use_itm_head, **extra)
        output[0].float().square().sum().backward()  # itm_score, or the ITC similarities

    return run


def _question_answering(patched: bool = False):
    model = _model("BlipForQuestionAnswering", 2, patched)
    generator = torch.Generator().manual_seed(2)
    question, question_mask = text_batch(2, 7, generator, pad_last_from=5)
    answer, _ = text_batch(2, 4, generator)
    return lambda: model(input_ids=question, pixel_values=images(2, generator),
                         attention_mask=question_mask, labels=answer).loss.backward()


def _blip_pretrain_negatives():
    """The pre-training step's other way of drawing ITM negatives
    (``matching_negatives="blip_pretrain"``), alone: the rest of the step is the one above."""
    from blipfast.train.pretraining import _blip_pretrain_negatives

    generator = torch.Generator().manual_seed(4)
    image, text, image_momentum, text_momentum = (
        torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=-1)
        for _ in range(4))
    for ids in (None, torch.tensor([0, 1, 0, 2, 2])):
        _blip_pretrain_negatives(image, text, image_momentum, text_momentum,
                                 torch.tensor([14.0]), ids, generator)


def _pretraining():
    torch.manual_seed(3)
    model = BlipForPreTraining(tiny_config(), queue_size=4, momentum=0.9,
                               encoder_token_id=5).train()
    generator = torch.Generator().manual_seed(3)
    ids, mask = text_batch(3, 7, generator, pad_last_from=4)
    pixels = images(3, generator)

    def run():
        for step in range(2):  # the second step reads a queue written by the first
            output = model(pixels, ids, mask, alpha=0.4, image_ids=torch.tensor([0, 1, 0]),
                           generator=torch.Generator().manual_seed(step))
            output.loss.backward()

    return run


STEPS = {
    "captioning": _captioning,
    "retrieval_itm": lambda: _retrieval(True),
    "retrieval_itm_shared_images": lambda: _retrieval(True, shared_images=True),
    "retrieval_itc": lambda: _retrieval(False),
    "question_answering": _question_answering,
    "pretraining": _pretraining,
    "pretraining_blip_pretrain_negatives": lambda: _blip_pretrain_negatives,
    # transformers' models after blipfast.patch: a read fails the test whether it comes
    # from transformers' own code (origin None) or from the patch layer
    "patched_captioning": lambda: _captioning(patched=True),
    "patched_retrieval_itm": lambda: _retrieval(True, patched=True),
    "patched_retrieval_itc": lambda: _retrieval(False, patched=True),
    "patched_question_answering": lambda: _question_answering(patched=True),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_forward_and_backward_read_no_tensor_values(step):
    assert _reads_outside_cpu_checks(STEPS[step]()) == []


def test_host_reads_are_caught():
    """The detector itself: each kind of read is caught, with its origin, and the allowed
    CPU check is told apart."""
    from blipfast import ops

    reads_in_test_code = [
        lambda x: x.sum().item(), lambda x: bool(x.any()), lambda x: int(x[0]),
        lambda x: x.tolist(), lambda x: x.numpy(), lambda x: x[x > 0],
        lambda x: x.nonzero(), lambda x: torch.unique(x), lambda x: x.masked_select(x > 0),
        lambda x: x.long().repeat_interleave(x.long()),
        lambda x: x.__setitem__(x > 0, 0.0),
    ]
    for read in reads_in_test_code:
        with HostReads() as reads:
            read(torch.ones(3))
        assert reads.origins and set(reads.origins) == {None}, read  # not blipfast's code
    with HostReads() as reads:
        torch.ones(3).long().repeat_interleave(torch.ones(3, dtype=torch.long), output_size=3)
    assert reads.origins == []

    def cpu_check():
        q = torch.randn(2, 4, 1, 16)
        ops.attention(q, q[:1], q[:1], kv_index=torch.tensor([0, 0]))  # the CPU range check

    with HostReads() as reads:
        cpu_check()
    assert ("_checks.py", "check_values") in reads.origins
    assert _reads_outside_cpu_checks(cpu_check) == []
