"""Run a function on several CPU processes joined in a gloo process group (for tests).

    from distributed_harness import run_on_ranks

    def _check(rank, world_size, scale):   # module level: it is pickled by reference
        ...
        return some_cpu_tensor

    results = run_on_ranks(3, _check, 2.0)  # [rank 0's result, rank 1's, rank 2's]

Each spawn starts ``world_size`` fresh Python processes that import torch (seconds each),
so do several checks per spawn rather than one spawn per check.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0


class RanksFailed(RuntimeError):
    """One or more ranks of :func:`run_on_ranks` raised; the message has their tracebacks."""


def run_on_ranks(world_size: int, function: Callable[..., Any], *args: Any,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Call ``function(rank, world_size, *args)`` on ``world_size`` processes; their results.

    The processes are started with the ``spawn`` method, join a gloo process group through a
    file store in a fresh temporary directory (no TCP port to collide on), run on one CPU
    thread each, and destroy the group when ``function`` returns.

    Args:
        world_size: number of processes (ranks), at least 1.
        function: a module-level (picklable) function ``(rank, world_size, *args)``.
        args: picklable arguments passed to every rank.
        timeout_s: wall-clock limit for the whole run, start-up included; a rank that
            hangs (e.g. in a collective) makes the run fail instead of hanging the suite.

    Returns:
        The return values of ``function`` (picklable, e.g. CPU tensors), in rank order.

    Raises:
        RanksFailed: a rank raised; the message carries the traceback of every rank that
            raised, the first to fail first (the others often fail only because a peer
            left a collective). The remaining ranks are terminated.
        torch.multiprocessing.ProcessExitedException: a rank died without raising.
        TimeoutError: the ranks did not all finish within ``timeout_s``.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_on_ranks: world_size must be a positive int, got {world_size!r}")
    with tempfile.TemporaryDirectory(prefix="blipfast-dist-") as directory:
        context = mp.start_processes(_run_rank, args=(world_size, directory, timeout_s,
                                                      function, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"run_on_ranks: {world_size} ranks of "
                                       f"{getattr(function, '__name__', function)} did not "
                                       f"finish within {timeout_s:.0f} s")
        except mp.ProcessRaisedException as error:
            raise RanksFailed(_failures(directory, world_size) or str(error)) from None
        finally:
            _stop(context.processes)
        return [torch.load(_path(directory, "result", rank), weights_only=False)
                for rank in range(world_size)]


def _run_rank(rank, world_size, directory, timeout_s, function, args):
    import interpreter_setup
    from seeds import salt_every_torch_seed

    salt_every_torch_seed()  # as conftest does in the parent, so that seeds agree
    interpreter_setup.install_when_interpreting()  # and the kernels compute alike
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # All ranks live on this machine: talk over loopback, whatever the hostname resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method="file://" + os.path.join(directory, "store"),
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = function(rank, world_size, *args)
    except BaseException:
        with open(_path(directory, "error", rank), "w") as file:
            file.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, _path(directory, "result", rank))


def _path(directory, kind, rank):
    return os.path.join(directory, f"{kind}-{rank}")


def _failures(directory, world_size):
    """Every failed rank's traceback, in the order the ranks failed."""
    failures = []
    for rank in range(world_size):
        if os.path.exists(_path(directory, "error", rank)):
            with open(_path(directory, "error", rank)) as file:
                when, _, text = file.read().partition("\n")
            failures.append((float(when), rank, text))
    return "\n".join(f"rank {rank} of {world_size} failed{' first' if i == 0 else ''}:\n{text}"
                     for i, (_, rank, text) in enumerate(sorted(failures)))


def _stop(processes):
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
