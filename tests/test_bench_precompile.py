"""bench/precompile_for_gpu.py: its archive keeps what a Triton cache hit reads and
points the cache's group files at wherever it is unpacked; its launch capture runs the
GPU tests' cases on CPU. (That the JIT then finds every packed kernel needs the GPU
machine's Triton 3.6: ``python bench/precompile_for_gpu.py --check ARCHIVE``.)"""

import ast
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "bench"))

import precompile_for_gpu as precompile  # noqa: E402


def _cache_entry(cache: Path, name: str, kernel: str, suffixes=(".json", ".cubin", ".ptx",
                                                                 ".llir", ".source")):
    """A finished compilation as Triton 3.6 writes it: files and a group file with
    absolute child paths."""
    entry = cache / name
    entry.mkdir(parents=True)
    children = {}
    for suffix in suffixes:
        path = entry / f"{kernel}{suffix}"
        path.write_bytes(f"{name}{suffix}".encode())
        children[path.name] = str(path)
    (entry / f"__grp__{kernel}.json").write_text(json.dumps({"child_paths": children}))
    return entry


def test_pack_keeps_metadata_and_binary_and_unpack_repoints_the_groups(tmp_path):
    cache = tmp_path / "build"
    _cache_entry(cache, "AAAA", "_forward_kernel")
    _cache_entry(cache, "BBBB", "_backward_kernel")
    unfinished = cache / "CCCC"  # being written: no group file yet
    unfinished.mkdir()
    (unfinished / "_other_kernel.cubin").write_bytes(b"partial")
    _cache_entry(cache, "DDDD", "_ptx_only_kernel", suffixes=(".json", ".ptx"))
    archive = tmp_path / "cache.tar.xz"

    assert precompile.pack(cache, archive, {"commit": "abc"}) == 2
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert names == ["AAAA/__grp___forward_kernel.json", "AAAA/_forward_kernel.cubin",
                     "AAAA/_forward_kernel.json", "BBBB/__grp___backward_kernel.json",
                     "BBBB/_backward_kernel.cubin", "BBBB/_backward_kernel.json",
                     "manifest.json"]

    into = tmp_path / "elsewhere" / "cache"
    manifest = precompile.unpack(archive, into)
    assert manifest == {"commit": "abc", "kernels": 2}
    group = json.loads((into / "AAAA" / "__grp___forward_kernel.json").read_text())
    assert group == {"child_paths": {
        "_forward_kernel.json": str(into / "AAAA" / "_forward_kernel.json"),
        "_forward_kernel.cubin": str(into / "AAAA" / "_forward_kernel.cubin")}}
    assert (into / "AAAA" / "_forward_kernel.cubin").read_bytes() == b"AAAA.cubin"
    assert not (into / "manifest.json").exists()
    assert sorted(path.name for path in into.iterdir()) == ["AAAA", "BBBB"]


def test_an_interrupted_pack_leaves_the_old_archive(tmp_path, monkeypatch):
    cache = tmp_path / "build"
    _cache_entry(cache, "AAAA", "_forward_kernel")
    archive = tmp_path / "cache.tar.xz"
    precompile.pack(cache, archive, {"commit": "old"})
    before = archive.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompile, "_add_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompile.pack(cache, archive, {"commit": "new"})
    assert archive.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["build", "cache.tar.xz"]


def test_unpack_refuses_members_outside_the_cache(tmp_path):
    archive = tmp_path / "bad.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        precompile._add_bytes(tar, "manifest.json", b"{}")
        precompile._add_bytes(tar, "../outside.cubin", b"x")
    with pytest.raises(ValueError, match="outside.cubin"):
        precompile.unpack(archive, tmp_path / "cache")
    assert not (tmp_path / "outside.cubin").exists()


def test_the_gpu_key_differs_from_this_machines_only_in_libtriton(monkeypatch):
    import triton.runtime.cache as cache

    own = precompile._file_sha256(precompile._libtriton_path())
    monkeypatch.setattr(cache, "triton_key", cache.triton_key)  # restored afterwards
    installed = cache.triton_key()
    assert own in installed
    other = "0" * 64
    precompile.key_for_gpu_machine(other)
    assert cache.triton_key() == installed.replace(own, other) != installed


def test_capture_replays_a_gpu_test_group_on_cpu():
    """In a process of its own: the capture compiles for the GPU, not the interpreter."""
    groups = precompile.gpu_test_groups()
    assert groups and all(group[0].startswith("tests/test_") for group in groups)
    layer_norm = next(index for index, group in enumerate(groups, 1)
                      if "tests/test_layer_norm_gpu.py" in group)
    environment = dict(os.environ)
    environment.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "precompile_for_gpu.py"),
         "--capture-only", "--unit", f"tests/{layer_norm}"],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("tests/"))
    counts = ast.literal_eval(line.split(": ", 1)[1].split("}")[0] + "}")  # the counts
    assert counts["run"] > 30 and counts["stopped early"] == 0, line
    assert int(line.split("}, ")[1].split()[0]) > counts["run"], line  # fwd + bwd each


def test_every_gpu_test_module_runs_in_a_gpu_session_group():
    """A GPU test module that no group of bench/gpu_test_groups.txt names would never run
    on the GPU machine (gpu_session.sh runs exactly those groups)."""
    grouped = {argument for stage in ("tests", "tests-models")
               for group in precompile.gpu_test_groups(stage) for argument in group}
    gpu_modules = {f"tests/{path.name}" for path in (REPOSITORY / "tests").glob("test_*.py")
                   if path.name != Path(__file__).name  # names the markers below
                   and any(marker in path.read_text() for marker in
                          ("pytest.mark.gpu", "KERNEL_DEVICES", '["cuda"]'))}
    assert "tests/test_attention_gpu.py" in gpu_modules
    assert "tests/test_hard_negatives.py" in gpu_modules  # devices ["cpu"] + ["cuda"]
    assert gpu_modules <= grouped, sorted(gpu_modules - grouped)
    assert all((REPOSITORY / argument).exists() for argument in grouped
               if argument.startswith("tests/"))


GPU_MODEL_TEST = '''
import pytest
import torch

import blipfast
from blipfast import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _leaf(*shape, generator):
    return torch.randn(*shape, generator=generator).cuda().requires_grad_()


def test_ops_return_the_reference_values_and_gradients():
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (_leaf(2, 7, 2, 16, generator=generator) for _ in range(3))
    x, weight, bias = (_leaf(*shape, generator=generator) for shape in ((2, 7, 32), (32,), (32,)))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):
        out = blipfast.ops.attention(q, k, v, causal=True)
        normed = blipfast.ops.layer_norm(x, weight, bias)
    expected = reference.attention(q, k, v, causal=True)
    expected_normed = reference.layer_norm(x, weight, bias)
    assert torch.equal(out, expected) and torch.equal(normed, expected_normed)
    assert out.is_contiguous() and not expected.is_contiguous()  # the kernel's layout
    inputs = (q, k, v, x, weight, bias)
    gradients = torch.autograd.grad((out.sum() + normed.square().sum()), inputs)
    expected_gradients = torch.autograd.grad(
        (expected.sum() + expected_normed.square().sum()), inputs)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert torch.equal(gradient, expected_gradient)


def test_hard_negatives_are_the_references_draws():
    generator = torch.Generator("cuda").manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1)
                   for _ in range(2))
    output = blipfast.ops.contrastive_loss_with_hard_negatives(
        image.cuda(), text.cuda(), torch.tensor(10.0), generator=torch.Generator("cuda").manual_seed(1))
    assert bool((output.negative_text_index >= 0).all())
    assert bool((output.negative_text_index != torch.arange(6)).all())


def test_a_failed_check_is_counted_as_run():
    assert False


class SlowReference(torch.nn.Module):
    def forward(self, x):
        return x


def test_a_reference_called_after_the_ops_ends_the_test():
    x = torch.randn(3, 32).cuda()
    blipfast.ops.bias_gelu(x, torch.zeros(32).cuda())
    SlowReference()(x)
    blipfast.ops.cross_entropy(torch.randn(3, 5).cuda(), torch.tensor([0, 1, 2]).cuda())
'''


def test_model_test_replay_runs_gpu_tests_on_cpu_with_reference_values(tmp_path):
    """The tests-models capture (bench/model_test_replay.py), in a process of its own: a
    GPU test module runs on CPU with its CUDA calls stood in for, each op returns its
    reference values (in the kernel's layout) and gradients (the module's own checks), and
    the capture records the ops' forward and backward kernels; a reference named as having
    no kernels ends its test, unrun, after the ops before it were recorded."""
    module = tmp_path / "test_stand_in_gpu.py"
    module.write_text(GPU_MODEL_TEST)
    script = f"""
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path[:0] = [{str(REPOSITORY / 'bench')!r}, {str(REPOSITORY / 'tests')!r}]
import precompile_for_gpu, model_test_replay
from pathlib import Path
launches = precompile_for_gpu.Launches()
with precompile_for_gpu.capturing(launches):
    plugin = model_test_replay.run_model_tests(
        [{str(module)!r}], Path({str(tmp_path)!r}),
        references=(("test_stand_in_gpu", "SlowReference"),))
import torch
assert torch.equal(sys.modules["test_stand_in_gpu"].SlowReference()(torch.ones(2)), torch.ones(2))
print(plugin.counts, plugin.stopped)
print(sorted({{job[1] for job in launches.jobs.values()}}))
"""
    environment = dict(os.environ)
    environment.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPOSITORY, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts_line, kernels_line = result.stdout.strip().splitlines()[-2:]
    assert counts_line.startswith(
        "{'run': 4, 'checks failed': 1, 'stopped early': 0, 'skipped': 0, "
        "'ended at a reference': 1} []"), counts_line
    kernels = ast.literal_eval(kernels_line)
    # launched before the reference, which was not run (and is restored after), and not after it
    assert "_bias_gelu_forward_kernel" in kernels, kernels
    assert not any("cross_entropy" in name for name in kernels), kernels
    for name in ("_attention_forward_kernel", "_attention_backward_dkdv_kernel",
                 "_layer_norm_forward_kernel", "_layer_norm_backward_kernel"):
        assert name in kernels, kernels
    assert any("contrastive" in name or "stats" in name for name in kernels), kernels


def test_the_references_the_model_replay_skips_exist():
    """The replay's list of kernel-free references names classes the GPU model tests use
    (a renamed class would silently run again, for an hour on CPU)."""
    import importlib

    sys.path.insert(0, str(REPOSITORY / "bench"))
    import model_test_replay

    for module_name, class_name in model_test_replay.REFERENCES_WITHOUT_KERNELS:
        reference = getattr(importlib.import_module(module_name), class_name)
        assert "forward" in vars(reference)
        assert any(f"{class_name}(" in (REPOSITORY / "tests" / path.name).read_text()
                   for path in (REPOSITORY / "tests").glob("test_*_gpu.py")), class_name
