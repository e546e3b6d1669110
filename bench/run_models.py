"""BLIP training steps: transformers eager vs transformers patched by blipfast vs blipfast's
own model (optionally transformers under torch.compile), same weights, side by side.

Usage (GPU)::

    python bench/run_models.py                      # BLIP-base, batch 64, text 35, bf16
    python bench/run_models.py --compile            # also transformers + torch.compile
    python bench/run_models.py --steps captioning --batch 32
    python bench/run_models.py --recompute-projections  # also blipfast trading matmuls
                                                        # for memory (ViT QKV, fc1 outputs)

CPU: ``--cpu-smoke`` runs the harness on a tiny config in float32 (no timing claims;
batch 4, text 9, 1 warmup and 2 timed steps unless ``--batch``, ``--length``, ``--warmup``,
``--iterations`` say otherwise).

Results are merged into the day's ``models-<device>-<date>.jsonl`` (the source of truth)
and ``.md``: a rerun replaces the measurements of the same step, implementation, batch and
text length and keeps every other. Ctrl-C stops measuring, prints and writes what
finished, and exits with status 130.

A step is forward + backward + fused AdamW update under bf16 autocast (fp32 master
weights), as users train. Steps (BLIP-base: ViT-B/16 at 384 px, BERT-base text):
- ``captioning``: ``BlipForConditionalGeneration`` with labels (LM loss);
- ``itm``: ``BlipForImageTextRetrieval`` ITM head, cross-entropy on random match labels;
- ``itc``: ``BlipForImageTextRetrieval`` contrastive path, symmetric cross-entropy of the
  similarity matrix / 0.07;
- ``pretraining``: the full BLIP pre-training step (ITC with momentum encoders and a queue
  of 57600, ITM with hard negatives, LM): :class:`blipfast.train.BlipForPreTraining`
  against the straightforward implementation on transformers' modules
  (tests/pretraining_reference.py; its negatives are given, so it skips the sampling that
  Salesforce's code does with a per-row ``.item()`` loop). blipfast runs first and the
  reference is given, step by step, the negatives blipfast drew, so both score the same
  pairs and their losses can be compared.
Reported: median ms per step (CUDA events), peak allocated memory, ratio to eager, and
model FLOP utilization: the eager step's FLOPs (counted once with
``torch.utils.flop_counter``) per second, over the measured bf16 matmul rate of the GPU.
``--profile`` adds, per step, one profiled step per implementation: device time by kernel
category (matmul, attention, layer norm, GELU, loss, optimizer, copies, other) and the
costliest kernels.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from command_line import integer_at_least, writable_directory
from device_rates import matmul_rate
from result_files import (
    INTERRUPTED_EXIT_STATUS,
    ResultFile,
    blipfast_revision,
    stop_on_interrupt,
    write_day_results,
)

RESULTS = Path(__file__).resolve().parent / "results"
TESTS = Path(__file__).resolve().parent.parent / "tests"
STEPS = ("captioning", "itm", "itc", "pretraining")
QUEUE_SIZE = 57600
GPU_SETTINGS = dict(batch=64, length=35, iterations=10, warmup=3)
"""Defaults of --batch, --length, --iterations and --warmup on the GPU."""
SMOKE_SETTINGS = dict(batch=4, length=9, iterations=2, warmup=1)
"""Their defaults with --cpu-smoke (the tiny config)."""


def _config(smoke: bool):
    from transformers import BlipConfig

    if not smoke:
        return BlipConfig()
    return BlipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=97,
                         sep_token_id=98, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_text_hidden_size=16)


def _inputs(step: str, config, batch: int, length: int, device: str):
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    ids = torch.randint(3, min(vocab - 3, 30000), (batch, length), generator=generator)
    ids[:, 0] = config.text_config.bos_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[batch // 2:, length * 2 // 3:] = 0  # half the batch padded, as real captions are
    inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    if step == "captioning":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    elif step == "itm":
        inputs["match"] = torch.randint(0, 2, (batch,), generator=generator)
    elif step == "pretraining":
        ids[:, 0] = 101 if vocab > 101 else 1  # [CLS], as BLIP's tokenizer starts captions
        # negatives for the reference step: any other row
        inputs["negative_text_index"] = (torch.arange(batch) + 1) % batch
        inputs["negative_image_index"] = (torch.arange(batch) + 2) % batch
    return {key: value.to(device) for key, value in inputs.items()}


class DrawnNegatives:
    """The ITM negatives blipfast's pre-training step drew, in order, replayed to each
    reference model (which takes its negatives as inputs) so that both score the same
    image-text pairs: the kernel draws other negatives than a PyTorch sampler would from
    the same random state, and with other pairs the ITM losses differ by more than the
    implementations do. Steps beyond those recorded get the fixed negatives of the inputs."""

    def __init__(self):
        self.drawn = []
        self.replayed = {}  # id(model) -> steps replayed to it

    def record(self, output) -> None:
        text, image = output.negative_text_index, output.negative_image_index
        # -1 (no negative for the row) cannot occur here: every row has its own image
        self.drawn.append((text.detach().clone(), image.detach().clone()))

    def next_for(self, model, inputs):
        step = self.replayed.get(id(model), 0)
        if step >= len(self.drawn):
            return inputs["negative_text_index"], inputs["negative_image_index"]
        self.replayed[id(model)] = step + 1
        return self.drawn[step]


def _loss(step: str, model, inputs, negatives: Optional[DrawnNegatives] = None):
    if step == "pretraining":
        images, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        if hasattr(model, "trainable_parameters"):  # blipfast: draws its own negatives
            output = model(images, ids, mask, alpha=0.4)
            if negatives is not None:
                negatives.record(output)
            return output.loss
        text, image = (negatives.next_for(model, inputs) if negatives is not None
                       else (inputs["negative_text_index"], inputs["negative_image_index"]))
        return sum(model(images, ids, mask, 0.4, text, image))
    if step == "captioning":
        return model(**inputs).loss
    arguments = {key: value for key, value in inputs.items() if key != "match"}
    if step == "itm":
        return F.cross_entropy(model(**arguments).itm_score.float(), inputs["match"])
    similarity = model(**arguments, use_itm_head=False).itm_score.float() / 0.07
    targets = torch.arange(similarity.shape[0], device=similarity.device)
    return (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.t(), targets)) / 2


def _models(step: str, config, device: str, compile_peer: bool,
            recompute_projections: bool = False):
    import transformers

    import blipfast
    import blipfast.models as models

    if step == "pretraining":
        return _pretraining_models(config, device, compile_peer)
    name = "BlipForConditionalGeneration" if step == "captioning" else "BlipForImageTextRetrieval"
    torch.manual_seed(0)
    eager = getattr(transformers, name)(config).to(device)
    variants = {"transformers eager": eager,
                "transformers + blipfast.patch": blipfast.patch(copy.deepcopy(eager)),
                "blipfast model": getattr(models, name).from_hf(eager)}
    if recompute_projections:
        recomputing = getattr(models, name).from_hf(eager)
        models.recompute_projection_outputs(recomputing.vision_model.encoder)
        variants["blipfast model, projections recomputed"] = recomputing
    if compile_peer:
        variants["transformers + torch.compile"] = torch.compile(copy.deepcopy(eager))
    return variants


def _pretraining_models(config, device: str, compile_peer: bool):
    sys.path.insert(0, str(TESTS))
    from pretraining_reference import ReferencePreTraining, blipfast_state_dict

    from blipfast.train import BlipForPreTraining

    reference = ReferencePreTraining(config, queue_size=QUEUE_SIZE, momentum=0.995).to(device)
    ours = BlipForPreTraining(config, queue_size=QUEUE_SIZE, momentum=0.995)
    ours.load_state_dict(blipfast_state_dict(reference))
    # blipfast first: the references replay the negatives it draws (see DrawnNegatives)
    variants = {"blipfast BlipForPreTraining": ours.to(device), "transformers eager": reference}
    if compile_peer:
        variants["transformers + torch.compile"] = torch.compile(copy.deepcopy(reference))
    return variants


def _count_flops(step, model, inputs, device, dtype) -> float:
    """FLOPs of one forward + backward (matmuls and attention), counted on a copy of the
    eager model (a pre-training forward updates the momentum encoders and the queue, which
    would leave the measured model one step ahead of the others)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = _loss(step, model, inputs)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _matmul_rate(device: str, dtype) -> float:
    """Measured dense matmul FLOP/s in ``dtype`` (NaN off CUDA)."""
    return matmul_rate(dtype) if device == "cuda" else float("nan")


def _time_step(step, model, inputs, device, dtype, warmup, iterations, profile=False,
               negatives: Optional[DrawnNegatives] = None):
    model.train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")

    def one_step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = _loss(step, model, inputs, negatives)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    started = time.perf_counter()
    for _ in range(warmup):
        loss = one_step()
    first_seconds = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iterations):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = one_step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            loss = one_step()
            times.append((time.perf_counter() - begin) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    result = dict(ms=statistics.median(times), peak_gib=peak, loss=float(loss.detach()),
                  warmup_seconds=first_seconds)
    if profile:  # after the timed steps, so it changes neither time nor peak memory
        result["profile"] = _profile_step(one_step, device)
    return result


# Kernel-name patterns of each time category, tried in order (first match wins). Eager
# attention's products (bmm) count as matmul; its softmax as attention. The LM loss's
# log-softmax (CUDA: a SoftMax kernel with a LogSoftMax epilogue) comes before attention.
PROFILE_CATEGORIES = (
    ("loss", r"contrastive|cross_entropy|nll_loss|log_?softmax"),
    ("attention", r"_attention_|flash|fmha|sdpa|scaled_dot|cudnn.*(?:attn|mha)|softmax"),
    ("matmul", r"gemm|cublas|cutlass|xmma|nvjet|sm\d+_.*mma|matmul|addmm|\bmm\b|linear"),
    ("layer norm", r"layer_norm|layernorm"),
    ("gelu", r"gelu"),
    ("optimizer", r"adam|foreach|lerp"),
    ("copy / cast", r"copy|cast|to_copy|convert|fill|memset|memcpy|cat\b|index"),
)


def _profile_step(one_step, device: str) -> dict:
    """Time one step under torch.profiler and sum device time by category of kernel
    (``PROFILE_CATEGORIES``; the rest is "other"): {"categories": {name: ms},
    "top": [(kernel, ms, calls)]} for the 12 costliest kernels."""
    import re
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        one_step()
        if device == "cuda":
            torch.cuda.synchronize()
    kernels = {}
    for event in profiler.key_averages():
        microseconds = (getattr(event, "self_device_time_total", None)
                        or getattr(event, "self_cuda_time_total", 0)) if device == "cuda" \
            else event.self_cpu_time_total
        if microseconds > 0:
            total, calls = kernels.get(event.key, (0.0, 0))
            kernels[event.key] = (total + microseconds / 1e3, calls + event.count)
    categories = {name: 0.0 for name, _ in PROFILE_CATEGORIES} | {"other": 0.0}
    for kernel, (milliseconds, _) in kernels.items():
        name = next((name for name, pattern in PROFILE_CATEGORIES
                     if re.search(pattern, kernel, re.IGNORECASE)), "other")
        categories[name] += milliseconds
    top = sorted(((kernel, ms, calls) for kernel, (ms, calls) in kernels.items()),
                 key=lambda item: -item[1])[:12]
    return dict(categories=categories, top=top)


def _profile_table(profiles: dict) -> str:
    """Markdown: device ms per category (rows) for each implementation (columns)."""
    names = list(profiles)
    categories = list(next(iter(profiles.values()))["categories"])
    lines = ["| category | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for category in [*categories, "total"]:
        values = [sum(p["categories"].values()) if category == "total"
                  else p["categories"][category] for p in profiles.values()]
        lines.append(f"| {category} | " + " | ".join(f"{value:.2f}" for value in values) + " |")
    return "\n".join(lines)


def _environment(device: str) -> str:
    import transformers
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return (f"{name}, torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}, CUDA {torch.version.cuda}, "
            f"{blipfast_revision()}, {datetime.date.today().isoformat()}")


MEASUREMENT_IDENTITY: tuple[str, ...] = ("step", "implementation", "batch", "length")
"""The fields that identify a measurement: a rerun's record replaces the earlier one with
the same values; every other earlier record of the day's file is kept."""

EAGER = "transformers eager"


def _row(record: dict, eager: Optional[dict]) -> str:
    """A table row of one measurement; the speedup is against ``eager``, the eager model's
    record of the same step, batch and text length (if it has run)."""
    speedup = f"{eager['ms'] / record['ms']:.2f}x" if eager is not None else "(eager not yet run)"
    shape = f"{record.get('batch', '?')} x {record.get('length', '?')}"
    return (f"| {record['step']} | {shape} | {record['implementation']} | {record['ms']:.1f} "
            f"| {record['peak_gib']:.1f} | {speedup} | {100 * record['mfu']:.0f}% "
            f"| {record['loss']:.4f} |")


def _report_header(record: dict) -> str:
    """The report's first line: the model, precision, environment and matmul rate of a
    record (the newest)."""
    rate = record.get("matmul_rate", float("nan"))
    return (f"{record.get('model', 'BLIP')} training steps (forward+backward+AdamW), "
            f"{record.get('precision', '?')}; {record.get('environment', '?')}; "
            f"measured bf16 matmul rate {rate / 1e12:.0f} TFLOP/s")


def format_report(records: list[dict]) -> str:
    """The markdown report of run_models' records (the ``.jsonl`` rows): the newest
    record's setting and environment, one table row per record, grouped by step, batch and
    text length with the eager model first, then the device time by kernel category of
    each group that was profiled."""
    lines = [_report_header(records[-1] if records else {}),
             "",
             "| step | batch x text | implementation | ms | peak GiB | speedup vs eager | MFU "
             "| loss |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["step"], record.get("batch"), record.get("length"))
        groups.setdefault(key, []).append(record)
    profile_sections = []
    for (step, batch, length), group in groups.items():
        eager = next((record for record in group if record["implementation"] == EAGER), None)
        # eager's row first, whatever order they ran in
        for record in sorted(group, key=lambda record: record["implementation"] != EAGER):
            lines.append(_row(record, eager))
        profiles = {record["implementation"]: record["profile"] for record in group
                    if "profile" in record}
        if profiles:
            profile_sections.append(
                f"\n\nDevice time of one step by kernel category (ms), {step}, batch {batch} "
                f"x text {length}:\n\n{_profile_table(profiles)}")
    return "\n".join(lines) + "".join(profile_sections) + "\n"


def format_result_file(content: ResultFile) -> str:
    """The markdown report of a ``.jsonl`` result file's content."""
    return format_report(content.measurements)


def _description() -> str:
    """The module docstring's first paragraph, on one line (the --help description)."""
    return " ".join(__doc__.split("\n\n")[0].split())


def parse_arguments(arguments=None) -> argparse.Namespace:
    """Parse and check the command line (sizes must be positive; ``--batch``, ``--length``,
    ``--iterations`` and ``--warmup`` default to the GPU run's or, with ``--cpu-smoke``, the
    smoke run's values)."""
    parser = argparse.ArgumentParser(
        description=_description(),
        epilog="Results are merged into the day's models-<device>-<date>.jsonl and .md in "
               "--out (a rerun replaces the measurements it repeats, keeps the others); the "
               ".jsonl is the source of truth. Ctrl-C stops measuring, prints and writes what "
               "finished, and exits with status 130.")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--batch", type=integer_at_least(1), default=None,
                        help=f"batch size (default: {GPU_SETTINGS['batch']}; "
                             f"{SMOKE_SETTINGS['batch']} with --cpu-smoke)")
    parser.add_argument("--length", type=integer_at_least(1), default=None,
                        help=f"text length (default: {GPU_SETTINGS['length']}; "
                             f"{SMOKE_SETTINGS['length']} with --cpu-smoke)")
    parser.add_argument("--iterations", type=integer_at_least(1), default=None,
                        help=f"timed steps per implementation (default: "
                             f"{GPU_SETTINGS['iterations']}; {SMOKE_SETTINGS['iterations']} "
                             "with --cpu-smoke)")
    parser.add_argument("--warmup", type=integer_at_least(0), default=None,
                        help=f"untimed steps first (default: {GPU_SETTINGS['warmup']}; "
                             f"{SMOKE_SETTINGS['warmup']} with --cpu-smoke)")
    parser.add_argument("--compile", action="store_true", help="also transformers + torch.compile")
    parser.add_argument("--recompute-projections", action="store_true",
                        help="also blipfast's model with the ViT's QKV and fc1 outputs "
                             "recomputed in the backward (less memory, more matmul work)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per implementation: device ms by kernel "
                             "category and the costliest kernels")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny config on CPU, float32 (no GPU needed; results written "
                             "only with --out)")
    parser.add_argument("--out", type=writable_directory, default=None,
                        help="results directory (default: bench/results; with --cpu-smoke "
                             "nothing is written unless given)")
    options = parser.parse_args(arguments)
    defaults = SMOKE_SETTINGS if options.cpu_smoke else GPU_SETTINGS
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    positions = _config(options.cpu_smoke).text_config.max_position_embeddings
    if options.length > positions:
        parser.error(f"argument --length: at most {positions} (the "
                     f"{'smoke' if options.cpu_smoke else 'BLIP-base'} config's text "
                     f"positions), got {options.length}")
    return options


def main(arguments=None) -> int:
    """Time the selected steps, print the table and write the result files; 1 without a
    GPU (unless ``--cpu-smoke``), 130 when interrupted by Ctrl-C."""
    options = parse_arguments(arguments)
    smoke = options.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("CUDA is not available; the model benchmarks need a GPU "
              "(--cpu-smoke exercises the harness on CPU).", file=sys.stderr)
        return 1
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    batch, length = options.batch, options.length
    import transformers

    transformers.logging.set_verbosity_error()
    config = _config(smoke)
    matmul_rate = _matmul_rate(device, dtype)
    description = dict(model=f"BLIP-{'smoke' if smoke else 'base'}",
                       precision="float32" if smoke else "bf16 autocast",
                       environment=_environment(device))
    out = None
    if options.out is not None or not smoke:
        out = options.out or RESULTS
        device_name = "cpu-smoke" if smoke else torch.cuda.get_device_name().lower().replace(" ", "-")
        stem = f"models-{device_name}-{datetime.date.today().isoformat()}"
    records = []

    def write_results() -> None:
        write_day_results(out, stem, records, MEASUREMENT_IDENTITY, format_result_file)

    print(_report_header(dict(description, matmul_rate=matmul_rate)), flush=True)
    with stop_on_interrupt() as interruption:
        for step in options.steps:
            inputs = _inputs(step, config, batch, length, device)
            variants = _models(step, config, device, options.compile and not smoke,
                               options.recompute_projections)
            flops = _count_flops(step, variants[EAGER], inputs, device, dtype)
            negatives = DrawnNegatives() if step == "pretraining" else None
            eager = None
            for name, model in variants.items():
                result = _time_step(step, model, inputs, device, dtype, options.warmup,
                                    options.iterations, profile=options.profile,
                                    negatives=negatives)
                result["mfu"] = flops / (result["ms"] / 1e3) / matmul_rate
                record = dict(step=step, implementation=name, batch=batch, length=length,
                              flops=flops, matmul_rate=matmul_rate, **description, **result)
                records.append(record)
                eager = record if name == EAGER else eager
                print(_row(record, eager), flush=True)
                if "profile" in result:
                    for kernel, milliseconds, calls in result["profile"]["top"]:
                        print(f"    {milliseconds:8.2f} ms {calls:5d}x  {kernel[:110]}",
                              flush=True)
                if out is not None:  # after every measurement: an interrupted run keeps its rows
                    write_results()
                del model
                variants[name] = None
                if device == "cuda":
                    torch.cuda.empty_cache()
    print()
    if interruption.interrupted:
        print("Interrupted: partial results")
    print(format_report(records) if records else "No measurement finished.")
    if out is not None and records:
        write_results()  # once more: a Ctrl-C during the last rewrite
        print(f"Results written to {out / f'{stem}.md'} and {out / f'{stem}.jsonl'}",
              flush=True)
    return INTERRUPTED_EXIT_STATUS if interruption.interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before measuring started: nothing to summarize
        print("\nInterrupted (Ctrl-C) before any measurement.", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_STATUS)
