"""Compile, on a machine without a GPU, the Triton kernels that the GPU stages launch, for
an H100, into a Triton cache that the GPU machine then reads instead of compiling.

A GPU session has minutes of device time, and its stages spend a good part of them
compiling: every test case x dtype, every benchmark shape and every tile candidate of
the sweep is its own kernel specialization. This tool runs what a stage runs, on CPU
tensors with the kernel launches intercepted, compiles each distinct launch for sm90 as
the JIT would on the GPU (the specialization from the JIT's own binder, as
``register_report.py`` does), and packs the binaries into one archive, which
``bench/gpu_session.sh`` unpacks into ``TRITON_CACHE_DIR`` when it is there. Along the
way it reports every launch that fails to compile for sm90 or needs more shared memory
than an H100 gives a program: failures a GPU run would otherwise find first.

    python bench/precompile_for_gpu.py                        # the kernel tests' launches
    python bench/precompile_for_gpu.py --stage tests --stage benchmarks --stage sweep
    python bench/precompile_for_gpu.py --stage tests --stage tests-models --stage benchmarks
    python bench/precompile_for_gpu.py --check .triton-cache.tar.xz  # does the JIT find them?
    python bench/precompile_for_gpu.py --unpack .triton-cache.tar.xz --into DIR  # GPU side

Measured on a 2-core CPU machine: the four stages are 2067 distinct kernels, compiled in
23 minutes into a 31 MiB archive (``--check``: 9 minutes); tests, tests-models and
benchmarks alone 924, in 14 minutes, 12 MiB (``--check``: 8 minutes). Later runs
(2026-12-07, beside other jobs) took far longer: the ``tests`` units 15 minutes, the
first ``tests-models`` unit (BLIP models) 15, and the second (the BLIP-base pre-training
tests, reference and capture both on CPU) over an hour at 16 GB of memory without
finishing; it was stopped, and the archive packed without its kernels (871 in 11.6
MiB). Since its references are not run (``model_test_replay.REFERENCES_WITHOUT_KERNELS``)
and graphs dropped without a backward are freed, that unit's capture takes 7 minutes
(71 distinct launches; 19 GB of memory at its peak: two BLIP-base pre-training models
with momentum encoders, optimizer state and both paths' activations, in float32). A unit
stops on SIGTERM; SIGINT may wait for minutes. The archive is git-ignored: a new checkout
does not have it, so build it in the session that has the GPU, before the device calls.

Stages: ``tests`` (the GPU test modules of ``gpu_session.sh tests``), ``tests-models``
(those of ``gpu_session.sh tests-models``: BLIP-base models and the pre-training step, run
on CPU through ``model_test_replay.py``: 8 minutes when first measured, see above),
``benchmarks`` (blipfast's attention and contrastive loss at the benchmark shapes,
forward and backward), ``sweep`` (every candidate of ``sweep_attention_configs.py``). The
archive (default ``.triton-cache.tar.xz``, git-ignored) travels with a device call by
naming it in ``carry``.

Triton finds a cached kernel only when its whole cache key agrees: the Triton build
(its Python files and ``libtriton.so``, whose hash differs between Python versions), the
kernel source, the specialization, the compile options, the ptxas version and the
``TRITON_*`` variables that change compilation. So run this with the GPU machine's
Triton version (3.6, see ``register_report.py``); the key is computed for the GPU
machine's ``libtriton.so`` (Python 3.12's wheel: ``--libtriton-sha256``), and ``--unpack``
on the GPU machine says whether each part of the key agrees there. A key that does not
agree costs nothing but the unpacking: Triton compiles as it would have.

The key also depends on the order in which a process first launches its kernels:
Triton 3.6 hashes a kernel's source once, at its first launch, and takes in the global
constants its helper functions use only when those helpers were already hashed for an
earlier kernel. So the launches are replayed per GPU process, as each launches them: one
fresh process per test group of ``gpu_test_groups.txt``, one per benchmark script, one
for the sweep, each hashing a kernel at its first launch as the JIT does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPOSITORY = Path(__file__).resolve().parent.parent
BUILD_DIRECTORY = Path("/tmp/blipfast-precompile-cache")  # Triton's cache while compiling
DEFAULT_ARCHIVE = REPOSITORY / ".triton-cache.tar.xz"
MANIFEST = "manifest.json"

# libtriton.so's sha256 in the GPU machine's Triton: Python 3.12 (the device tool's
# KINDS.md) and the PyPI wheel (triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64.
# manylinux_2_28_x86_64.whl, from its RECORD). The wheels for other Python versions
# differ only in their compiled libraries.
GPU_MACHINE_LIBTRITON_SHA256 = {
    "3.6.0": "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87",
}
H100_SHARED_BYTES_PER_PROGRAM = 227 * 1024  # the most one program may opt in to on sm90

TEST_GROUPS = REPOSITORY / "bench" / "gpu_test_groups.txt"


def gpu_test_groups(stage: str = "tests") -> list[list[str]]:
    """The pytest arguments of each of ``stage``'s GPU test processes."""
    import shlex

    prefix = f"{stage}: "
    return [shlex.split(line[len(prefix):]) for line in TEST_GROUPS.read_text().splitlines()
            if line.startswith(prefix)]


# --------------------------------------------------------------------------------------
# Key parts
# --------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _libtriton_path() -> Path:
    import sysconfig

    import triton

    extension = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    return Path(triton.__file__).parent / "_C" / f"libtriton.{extension}"


@functools.lru_cache(maxsize=None)
def _own_libtriton_sha256() -> str:
    """This machine's ``libtriton.so`` hash (400 MB read once per process)."""
    return _file_sha256(_libtriton_path())


def key_parts() -> dict[str, Any]:
    """What this machine's Triton puts into every kernel's cache key, besides the kernel,
    its specialization and its options: compared between the two machines."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import triton_key

    return {"triton": triton.__version__,
            "libtriton_sha256": _own_libtriton_sha256(),
            "triton_key_sha256": hashlib.sha256(triton_key().encode()).hexdigest(),
            "ptxas": get_ptxas_version(90).strip().splitlines()[-1],
            "environment": dict(sorted(get_cache_invalidating_env_vars().items()))}


def key_for_gpu_machine(libtriton_sha256: str) -> None:
    """Make this process's Triton key its kernels as the GPU machine's Triton would: the
    same build but for its ``libtriton.so`` (another Python version's)."""
    import triton.runtime.cache as cache

    own = _own_libtriton_sha256()
    if own == libtriton_sha256:
        return
    installed_key = cache.triton_key()
    if own not in installed_key:
        raise RuntimeError("this Triton's cache key does not contain its libtriton hash; "
                           "the key cannot be made the GPU machine's")
    gpu_key = installed_key.replace(own, libtriton_sha256)
    cache.triton_key = lambda: gpu_key  # read by get_cache_key, module-global


# --------------------------------------------------------------------------------------
# Capturing launches
# --------------------------------------------------------------------------------------


class Launches:
    """The distinct launches made while capturing, as picklable compile jobs; or, with
    ``through_jit`` (``--check``), none: each launch runs through the JIT's own ``run``
    as a warm-up instead (compiled or found in the cache, not launched)."""

    def __init__(self, through_jit: bool = False) -> None:
        self.jobs: dict[str, tuple] = {}
        self.through_jit = through_jit

    def record(self, kernel, *args, grid, warmup, **kwargs) -> None:  # noqa: ARG002
        from register_report import TARGET, launch_specialization

        kernel.cache_key  # hashed at its first launch, as the JIT does (module doc)
        signature, constexprs, attrs, options = launch_specialization(kernel, args, kwargs,
                                                                      TARGET)
        job = (kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs,
               options.__dict__)
        self.jobs.setdefault(repr(job), job)


@contextlib.contextmanager
def capturing(launches: Launches) -> Iterator[None]:
    """Within it, the ops take their Triton path on CPU tensors and no kernel runs: each
    launch goes to ``launches`` (outputs stay unwritten: nothing may be checked)."""
    from unittest import mock

    from triton.runtime.jit import JITFunction

    import blipfast.kernels.layer_norm as layer_norm_kernels
    from launch_interception import ops_path
    from register_report import H100_MULTIPROCESSORS

    original_run = JITFunction.run

    def record(kernel, *args, grid, warmup, **kwargs):  # a function: binds to the kernel
        if launches.through_jit:
            return original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        launches.record(kernel, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    with mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(layer_norm_kernels, "_multiprocessors",
                              lambda device: H100_MULTIPROCESSORS), \
            ops_path(triton=True):
        yield


def cpu_for_cuda(value: Any) -> Any:
    """"cpu" for a CUDA device ("cuda", "cuda:0", torch.device("cuda")); ``value`` else."""
    if isinstance(value, str) and value.split(":")[0] == "cuda":
        return "cpu"
    import torch

    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


def _on_cpu(function: Callable) -> Callable:
    """``function`` with every CUDA device among its arguments passed as "cpu"."""
    def call(*args, **kwargs):
        return function(*map(cpu_for_cuda, args),
                        **{key: cpu_for_cuda(value) for key, value in kwargs.items()})
    return call


def _no_check(*args, **kwargs) -> None:
    return None


def capture_tests(launches: Launches, pytest_arguments: list[str]) -> dict[str, int]:
    """Run the GPU tests that ``pytest_arguments`` select (files, ``-k``), in pytest's
    order, on CPU tensors with launches captured; checks are switched off, as outputs
    stay unwritten. The case helpers are called with "cpu" where the tests pass "cuda";
    tests that need CUDA itself (torch.compile with inductor) are left out."""
    import pytest
    from unittest import mock

    sys.path.insert(0, str(REPOSITORY / "tests"))

    class Collector:
        items: list = []

        def pytest_collection_finish(self, session):  # after -k deselects
            self.items = list(session.items)

    collector = Collector()
    arguments = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                 "--rootdir", str(REPOSITORY), *pytest_arguments]
    with contextlib.redirect_stdout(io.StringIO()):
        status = pytest.main(arguments, plugins=[collector])
    if status not in (0, 5):
        raise RuntimeError(f"collecting the GPU tests failed (pytest exit {status})")

    import tolerances

    counts = {"run": 0, "left out": 0, "stopped early": 0}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(tolerances, "assert_close_to_reference",
                                              _no_check))
        stack.enter_context(mock.patch("torch.testing.assert_close", _no_check))
        for module in {item.module for item in collector.items}:
            for name, value in list(vars(module).items()):
                if callable(value) and getattr(value, "__module__", "").endswith("_cases"):
                    stack.enter_context(mock.patch.object(module, name, _on_cpu(value)))
        for module in [sys.modules[name] for name in sys.modules if name.endswith("_cases")]:
            if hasattr(module, "assert_close_to_reference"):
                stack.enter_context(mock.patch.object(module, "assert_close_to_reference",
                                                      _no_check))
        for item in collector.items:
            if "torch_compile" in item.name:
                counts["left out"] += 1
                continue
            parameters = item.callspec.params if hasattr(item, "callspec") else {}
            parameters = {key: cpu_for_cuda(value) for key, value in parameters.items()}
            counts["run"] += 1
            with capturing(launches):
                try:
                    item.obj(**parameters)
                except (AssertionError, pytest.skip.Exception):
                    pass
                except Exception as error:  # unwritten outputs may break what follows
                    counts["stopped early"] += 1
                    if os.environ.get("PRECOMPILE_DEBUG"):
                        print(f"{item.nodeid}: {type(error).__name__}: {error}"[:300])
    return counts


def capture_model_tests(launches: Launches, pytest_arguments: list[str]) -> dict[str, int]:
    """Run the GPU model tests that ``pytest_arguments`` select, on CPU with launches
    captured: each op on its Triton path for the launches and on its reference path for
    the values the test goes on with (``model_test_replay.py``)."""
    import model_test_replay

    sys.path.insert(0, str(REPOSITORY / "tests"))
    with capturing(launches):
        plugin = model_test_replay.run_model_tests(pytest_arguments, REPOSITORY)
    if os.environ.get("PRECOMPILE_DEBUG"):
        print("\n".join(plugin.stopped + plugin.failed_checks))
    return plugin.counts


def capture_attention_benchmarks(launches: Launches) -> dict[str, int]:
    """blipfast's attention, forward and backward, at the benchmark shapes, as
    ``run_attention.py`` calls it."""
    import torch

    import attention_benchmark_cases as attention_cases

    with capturing(launches):
        for case in attention_cases.CASES:
            inputs = attention_cases.make_inputs(case, requires_grad=True, device="cpu")
            out = attention_cases._build_blipfast_forward(case, inputs)()
            torch.autograd.grad(out, (inputs.query, inputs.key, inputs.value),
                                inputs.output_gradient)
    return {"shapes": len(attention_cases.CASES)}


def capture_contrastive_benchmarks(launches: Launches) -> dict[str, int]:
    """blipfast's contrastive loss, forward and backward, at the benchmark shapes, as
    ``run_contrastive.py`` calls it."""
    import contrastive_benchmark_cases as contrastive_cases

    settings = contrastive_cases.RunSettings(device="cpu", verify=False)
    with capturing(launches):
        for case in contrastive_cases.CASES:
            inputs = contrastive_cases.make_inputs(case, settings)
            contrastive_cases._build_blipfast_step(case, inputs)()
    return {"shapes": len(contrastive_cases.CASES)}


def capture_sweep(launches: Launches) -> dict[str, int]:
    """Every candidate of the attention tile sweep, as its ``--compile-only`` runs them."""
    from unittest import mock

    import attention_benchmark_cases as attention_cases
    import sweep_attention_configs

    make_inputs = attention_cases.make_inputs

    def make_inputs_on_cpu(case, **options):
        return make_inputs(case, **dict(options, device="cpu"))

    with capturing(launches), \
            mock.patch.object(attention_cases, "make_inputs", make_inputs_on_cpu), \
            mock.patch.object(sys, "argv", ["sweep", "--compile-only"]), \
            contextlib.redirect_stdout(io.StringIO()):
        sweep_attention_configs.main()
    return {}


# --------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------


# (kernel name, cache hash, shared memory bytes, error): the last two exclusive
CompileResult = tuple[str, str, Optional[int], Optional[str]]


def _compile(job: tuple) -> CompileResult:
    """Compile one job for sm90 into Triton's cache: (kernel, cache hash, shared memory
    bytes, error)."""
    import triton
    from triton.compiler import ASTSource

    from register_report import TARGET

    module, name, signature, constexprs, attrs, options = job
    kernel = getattr(importlib.import_module(module), name)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=TARGET, options=options)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return name, "", None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return name, compiled.hash, compiled.metadata.shared, None


def compile_all(jobs: list[tuple], processes: int) -> list[CompileResult]:
    """Compile every job, ``processes`` at a time (forked: they share the imports)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return list(pool.map(_compile, jobs, chunksize=4))


# --------------------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------------------


def pack(cache: Path, archive: Path, manifest: dict[str, Any]) -> int:
    """Write ``archive`` (tar.xz): each cache entry's metadata and binary (what a cache
    hit reads; the intermediate IRs and PTX are left out) and ``manifest``. Returns the
    number of kernels packed."""
    cache.mkdir(parents=True, exist_ok=True)
    temporary = archive.with_name(archive.name + ".partial")
    try:
        kernels = _write_archive(cache, temporary, manifest)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, archive)  # an interrupted run leaves the old archive whole
    return kernels


def _write_archive(cache: Path, archive: Path, manifest: dict[str, Any]) -> int:
    kernels = 0
    with tarfile.open(archive, "w:xz") as tar:
        for entry in sorted(path for path in cache.iterdir() if path.is_dir()):
            groups = list(entry.glob("__grp__*.json"))
            if len(groups) != 1:
                continue  # not a finished compilation
            group = json.loads(groups[0].read_text())
            kept = {name: path for name, path in group.get("child_paths", {}).items()
                    if Path(name).suffix in (".json", ".cubin")}
            if not any(name.endswith(".cubin") for name in kept):
                continue
            for name in kept:
                tar.add(entry / name, arcname=f"{entry.name}/{name}")
            # child paths are absolute: written relative here, made absolute on unpacking
            _add_bytes(tar, f"{entry.name}/{groups[0].name}",
                       json.dumps({"child_paths": {name: name for name in kept}}).encode())
            kernels += 1
        _add_bytes(tar, MANIFEST, json.dumps(dict(manifest, kernels=kernels),
                                             indent=1).encode())
    return kernels


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _opened_archive(archive: Path) -> tarfile.TarFile:
    """``archive`` opened for reading; ValueError when it is not a readable .tar.xz."""
    try:
        return tarfile.open(archive, "r:xz")
    except (tarfile.ReadError, EOFError, OSError) as error:
        raise ValueError(f"{archive}: not a readable .tar.xz archive ({error})") from None


def _manifest(tar: tarfile.TarFile, archive: Path) -> dict[str, Any]:
    """The manifest packed in ``tar``; ValueError when there is none."""
    try:
        return json.loads(tar.extractfile(MANIFEST).read())
    except KeyError:
        raise ValueError(f"{archive}: no {MANIFEST} (not an archive this tool "
                         "packed)") from None


def read_manifest(archive: Path) -> dict[str, Any]:
    """The manifest of ``archive``, without unpacking it; ValueError as :func:`unpack`."""
    with _opened_archive(archive) as tar:
        return _manifest(tar, archive)


def unpack(archive: Path, into: Path) -> dict[str, Any]:
    """Unpack ``archive`` into the cache directory ``into`` (entries already there are
    kept) with its group files pointing there; returns the manifest. ValueError (before
    ``into`` is made) when ``archive`` is no .tar.xz or holds no manifest."""
    with _opened_archive(archive) as tar:
        manifest = _manifest(tar, archive)
        into.mkdir(parents=True, exist_ok=True)
        members = [m for m in tar.getmembers() if m.name != MANIFEST]
        for member in members:
            kind_ok = member.isfile() or member.isdir()
            if not kind_ok or member.name.startswith("/") or ".." in member.name:
                raise ValueError(f"unexpected archive member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4, 3.12
            tar.extractall(into, members=members, filter="data")
        else:  # pragma: no cover
            tar.extractall(into, members=members)
    for group_path in into.glob("*/__grp__*.json"):
        group = json.loads(group_path.read_text())
        paths = {name: str(group_path.parent / Path(path).name)
                 for name, path in group["child_paths"].items()}
        group_path.write_text(json.dumps({"child_paths": paths}))
    return manifest


def compare_key_parts(manifest: dict[str, Any]) -> list[str]:
    """The parts of the cache key on which this machine differs from the archive's."""
    here, built_for = key_parts(), manifest["key_parts"]
    return [f"{name}: here {here[name]!r}, archive {built_for.get(name)!r}"
            for name in here if here[name] != built_for.get(name)]


# --------------------------------------------------------------------------------------


class _StandInDriver:
    """Enough of Triton's CUDA driver for ``JITFunction.run`` to pick an H100 target and
    look up (or compile) a kernel, on a machine without one; nothing is launched."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:  # noqa: ARG002
        return 0

    def get_current_target(self):
        from register_report import TARGET

        return TARGET


# --------------------------------------------------------------------------------------
# Units: what one GPU process launches
# --------------------------------------------------------------------------------------


def units(stages: list[str]) -> list[str]:
    """The GPU processes of ``stages``, by name: "tests/3" is the third test group."""
    names = []
    for stage in stages:
        if stage in ("tests", "tests-models"):
            count = len(gpu_test_groups(stage))
            names += [f"{stage}/{index}" for index in range(1, count + 1)]
        elif stage == "benchmarks":
            names += ["benchmarks/attention", "benchmarks/contrastive"]
        else:
            names.append(stage)
    return names


def capture_unit(unit: str, launches: Launches) -> dict[str, int]:
    """Replay unit ``unit``'s launches in this process, into ``launches``."""
    stage, _, part = unit.partition("/")
    if stage == "tests":
        return capture_tests(launches, gpu_test_groups()[int(part) - 1])
    if stage == "tests-models":
        return capture_model_tests(launches, gpu_test_groups(stage)[int(part) - 1])
    if unit == "benchmarks/attention":
        return capture_attention_benchmarks(launches)
    if unit == "benchmarks/contrastive":
        return capture_contrastive_benchmarks(launches)
    if unit == "sweep":
        return capture_sweep(launches)
    raise ValueError(f"unknown unit {unit!r}")


def run_unit(unit: str, libtriton_sha256: str, processes: int, through_jit: bool,
             capture_only: bool) -> int:
    """(In a fresh process.) Replay ``unit`` and compile its launches into
    ``TRITON_CACHE_DIR``; with ``through_jit``, let the JIT look each launch up there
    instead. Returns the number of failures (compile errors, too much shared memory)."""
    started = time.time()
    launches = Launches(through_jit)
    if capture_only:
        counts = capture_unit(unit, launches)
        print(f"{unit}: {counts}, {len(launches.jobs)} distinct launches", flush=True)
        return 0
    key_for_gpu_machine(libtriton_sha256)
    if through_jit:
        from triton.runtime.driver import driver

        driver.set_active(_StandInDriver())
        counts = capture_unit(unit, launches)
        print(f"{unit}: {counts} ({time.time() - started:.0f} s)", flush=True)
        return 0
    counts = capture_unit(unit, launches)
    results = compile_all(list(launches.jobs.values()), processes)
    failures = [(name, error) for name, _, _, error in results if error]
    too_large = [(name, shared) for name, _, shared, error in results
                 if not error and shared > H100_SHARED_BYTES_PER_PROGRAM]
    print(f"{unit}: {counts}, compiled {len(results) - len(failures)} of {len(results)} "
          f"distinct launches for sm90 ({time.time() - started:.0f} s)", flush=True)
    for name, error in failures:
        print(f"  FAILED {name}: {error}")
    for name, shared in too_large:
        print(f"  TOO MUCH SHARED MEMORY {name}: {shared} bytes (H100: "
              f"{H100_SHARED_BYTES_PER_PROGRAM})")
    # the sweep tries candidates that do not fit on purpose
    return 0 if unit == "sweep" else len(failures) + len(too_large)


def _run_in_fresh_process(unit: str, libtriton_sha256: str, arguments: list[str],
                          environment: dict[str, str]) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), "--unit", unit,
               "--libtriton-sha256", libtriton_sha256, *arguments]
    return subprocess.run(command, cwd=REPOSITORY, env=environment).returncode


def check_archive(archive: Path) -> int:
    """Replay the archive's units through Triton's own launch path (``JITFunction.run``
    as a warm-up, a stand-in driver reporting an H100), each in a fresh process, against
    a cache holding only the archive, keyed as the archive was built. Every kernel the
    JIT compiles instead of finding there is one this tool would not have saved the GPU
    machine from compiling. Returns how many."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        cache = Path(directory) / "cache"
        manifest = unpack(archive, cache)
        packed = {path.name for path in cache.iterdir()}
        environment = dict(os.environ, TRITON_CACHE_DIR=str(cache))
        compiled = 0
        for unit in units(manifest["stages"]):
            before = {path.name for path in cache.iterdir()}
            _run_in_fresh_process(unit, manifest["key_parts"]["libtriton_sha256"],
                                  ["--through-jit"], environment)
            new = {path.name for path in cache.iterdir()} - before
            compiled += len(new)
            print(f"  the JIT compiled {len(new)} kernels not in the archive", flush=True)
    print(f"{len(packed)} kernels packed; the JIT compiled {compiled} more")
    return compiled


def _git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True,
                          text=True).stdout.strip()


def main() -> int:
    # The docstring's first paragraph (its first line alone stops mid-sentence).
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--stage", action="append",
                        choices=("tests", "tests-models", "benchmarks", "sweep"),
                        help="what to compile (repeatable; default: tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_ARCHIVE,
                        help="the archive to write (default: .triton-cache.tar.xz in the "
                             "repository root)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="compiling processes (default: one per CPU)")
    parser.add_argument("--libtriton-sha256", default=None,
                        help="the GPU machine's libtriton.so sha256 (default: Python 3.12's "
                             "wheel of this Triton version)")
    parser.add_argument("--capture-only", action="store_true",
                        help="count each unit's distinct launches; compile nothing")
    parser.add_argument("--check", type=Path,
                        help="check that Triton's JIT finds this archive's kernels")
    parser.add_argument("--unpack", type=Path, help="(GPU machine) unpack this archive")
    parser.add_argument("--into", type=Path, help="with --unpack: the cache directory")
    parser.add_argument("--unit", help=argparse.SUPPRESS)  # one GPU process's launches
    parser.add_argument("--through-jit", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    # Compile for the GPU, not the interpreter: set before triton is imported
    # (tests/conftest.py keeps a value already set; register_report.py removes it).
    sys.path.insert(0, str(REPOSITORY / "bench"))
    import register_report  # noqa: F401

    os.environ["TRITON_INTERPRET"] = "0"

    for name in ("unpack", "check"):
        archive = getattr(arguments, name)
        if archive is not None and not archive.is_file():
            parser.error(f"argument --{name}: no archive at {archive}")
    if arguments.into is not None and not arguments.unpack:
        parser.error("argument --into: only with --unpack")
    if arguments.unpack:
        if arguments.into is None:
            parser.error("--unpack needs --into (the TRITON_CACHE_DIR to use)")
        try:
            manifest = unpack(arguments.unpack, arguments.into)
        except ValueError as error:
            parser.error(f"argument --unpack: {error}")
        differences = compare_key_parts(manifest)
        changes = " with uncommitted changes" if manifest.get("uncommitted_changes") else ""
        print(f"unpacked {manifest['kernels']} kernels (commit {manifest['commit']}"
              f"{changes}) into {arguments.into}")
        print("cache keys agree with this machine's Triton" if not differences else
              "cache keys will NOT agree (Triton compiles as usual):\n  "
              + "\n  ".join(differences))
        return 0
    if arguments.unit:
        return min(run_unit(arguments.unit, arguments.libtriton_sha256, arguments.processes,
                            arguments.through_jit, arguments.capture_only), 100)

    import triton

    if arguments.check:  # keyed as the archive was built, with the Triton it was built with
        try:
            built_with = read_manifest(arguments.check)["key_parts"]["triton"]
        except ValueError as error:
            parser.error(f"argument --check: {error}")
        except KeyError as error:
            parser.error(f"argument --check: {arguments.check}: not an archive this tool "
                         f"packed (its manifest has no {error})")
        if built_with != triton.__version__:
            parser.error(f"argument --check: the archive was built with Triton {built_with}, "
                         f"this is {triton.__version__}: check it with that version")
        return 1 if check_archive(arguments.check) else 0
    stages = arguments.stage or ["tests"]
    libtriton = arguments.libtriton_sha256 or GPU_MACHINE_LIBTRITON_SHA256.get(
        triton.__version__, "" if arguments.capture_only else None)
    if libtriton is None:
        parser.error(f"Triton {triton.__version__}: give --libtriton-sha256 (the GPU "
                     f"machine's runs {', '.join(GPU_MACHINE_LIBTRITON_SHA256)})")
    if not arguments.capture_only:
        shutil.rmtree(BUILD_DIRECTORY, ignore_errors=True)
    environment = dict(os.environ, TRITON_CACHE_DIR=str(BUILD_DIRECTORY))
    extra = ["--processes", str(arguments.processes)]
    if arguments.capture_only:
        extra.append("--capture-only")
    failed_units = [unit for unit in units(stages)
                    if _run_in_fresh_process(unit, libtriton, extra, environment)]
    if arguments.capture_only:
        return 1 if failed_units else 0

    os.environ["TRITON_CACHE_DIR"] = str(BUILD_DIRECTORY)
    key_for_gpu_machine(libtriton)
    changes = _git("status", "--porcelain", "--untracked-files=no")
    manifest = {"commit": _git("rev-parse", "HEAD"), "uncommitted_changes": bool(changes),
                "kernels_tree": _git("rev-parse", "HEAD:kernels"), "stages": stages,
                "key_parts": dict(key_parts(), libtriton_sha256=libtriton)}
    kernels = pack(BUILD_DIRECTORY, arguments.out, manifest)
    print(f"packed {kernels} kernels into {arguments.out} "
          f"({arguments.out.stat().st_size / 2**20:.1f} MiB)"
          + (f"; units with failures: {', '.join(failed_units)}" if failed_units else ""))
    return 1 if failed_units else 0


if __name__ == "__main__":
    sys.exit(main())
