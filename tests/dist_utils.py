"""Run a function in several real gloo processes on 127.0.0.1 and collect what each returns.

Usage from a test (the function must be defined at module level so it can be pickled)::

    def work(rank, world_size, x):
        ...
        return result

    results = run_in_processes(work, 3, x)  # [result of rank 0, rank 1, rank 2]
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_in_processes"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_method() -> str:
    """Fresh interpreters, started quickly.

    A plain spawn imports torch (and unicom, which pulls in torchvision) again in every
    process: several seconds each on a busy machine. A fork server imports them once, before
    any torch op runs (so no thread pool exists to be broken by fork), and then forks each
    worker from that clean process: after the first call, a world of 3 starts in about a
    second.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    # Only takes effect before the server starts, i.e. on the first call in this process;
    # a module that fails to import is skipped there and imported by the workers instead.
    multiprocessing.set_forkserver_preload(
        ["torch", "torch.distributed", "pytest", "unicom", "unicom.programs.retrieval", "unicom.programs.knn"]
    )
    return "forkserver"


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    init: bool,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    # The torchrun variables, so code that calls unicom._distributed.setup() finds its group.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Several processes share two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        if init:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        result = fn(rank, world_size, *args)
    except BaseException:
        # Also written to a file: spawn's own report only carries the message.
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    with open(Path(out_dir, f"result{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_in_processes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init: bool = True,
    timeout_s: float = 60.0,
    wall_timeout_s: float = 300.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` new processes.

    With ``init=True`` each process joins a gloo process group on 127.0.0.1 (a free port)
    before ``fn`` runs and leaves it afterwards; with ``init=False`` only the torchrun
    environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) are set, for
    code that creates the group itself. ``fn`` and ``args`` must be picklable, and so must
    the results. Collectives time out after ``timeout_s`` so a hung rank fails the test, and
    the processes are killed after ``wall_timeout_s`` in any case.

    Returns:
        The results in rank order. Raises if any process fails (the error names the
        failing rank and carries its traceback).
    """
    with tempfile.TemporaryDirectory(prefix="unicom-dist-") as out_dir:
        try:
            context = mp.start_processes(
                _worker,
                args=(world_size, free_port(), out_dir, init, timeout_s, fn, args),
                nprocs=world_size,
                join=False,
                start_method=_start_method(),
            )
            # A hung rank (a collective some process never joins) fails the test instead of the whole run.
            deadline = time.monotonic() + wall_timeout_s
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    raise TimeoutError(f"the {world_size} processes did not finish within {wall_timeout_s} s")
        except Exception as err:
            reports = sorted(Path(out_dir).glob("error*.txt"))
            details = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in reports)
            raise RuntimeError(f"a process failed in run_in_processes:\n{details}") from err
        results = []
        for rank in range(world_size):
            with open(Path(out_dir, f"result{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
