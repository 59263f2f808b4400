"""Distributed helpers that work unchanged with one process and no process group.

Everything here answers sensibly whether or not ``torch.distributed`` has been
initialised: a single process is simply rank 0 of a world of size 1, gathers return
their input and reductions are no-ops. Tensors are always exchanged with tensor
collectives (never pickled objects), so gathering 100k+ features stays fast.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = [
    "is_initialized",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "setup",
    "cleanup",
    "barrier",
    "all_reduce_sum",
    "all_gather_varlen",
    "all_gather_with_grad",
    "broadcast_buffers",
    "shard_range",
    "wire_device",
]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables describe a process group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def setup(device: str | torch.device | None = None, backend: str | None = None) -> torch.device:
    """Initialise the process group when launched by torchrun and pick this process's device.

    ``device=None`` picks the local CUDA device when one exists, else the CPU. The backend
    defaults to NCCL for CUDA devices and gloo otherwise. Without torchrun variables no
    process group is created and the program runs as a single process.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not is_initialized() and int(os.environ["WORLD_SIZE"]) > 1:
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        # Collectives wait for the slowest process (long embedding or extraction shards).
        minutes = float(os.environ.get("UNICOM_DIST_TIMEOUT_MIN", 120))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes), **kwargs)
    return device


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def wire_device(tensor: torch.Tensor, backend: str | None = None) -> torch.device:
    """Where a collective on ``tensor`` runs: CUDA for NCCL (it takes no CPU tensors), the CPU
    for gloo (whose CUDA support is partial), else where the tensor is. ``backend`` defaults to
    the process group's."""
    backend = backend if backend is not None else (dist.get_backend() if is_initialized() else None)
    if backend == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda")  # the current device (setup() sets it)
    if backend == "gloo" and tensor.device.type != "cpu":
        return torch.device("cpu")
    return tensor.device


def _in_place(tensor: torch.Tensor, collective) -> None:
    """Run an in-place ``collective`` on ``tensor`` on the device the backend needs, then back."""
    wire = wire_device(tensor)
    moved = tensor if wire == tensor.device else tensor.to(wire)
    collective(moved)
    if moved is not tensor:
        tensor.copy_(moved)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place, whatever its device and the backend;
    returns it for chaining."""
    if is_initialized() and get_world_size() > 1:
        _in_place(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process ``src``'s buffers (BatchNorm running statistics, ...). DDP copies them
    only at the start of a training forward, so after the last one each process keeps its own
    (on CPUs, without SyncBatchNorm, they differ): call this before evaluating or saving."""
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        _in_place(buffer, lambda t: dist.broadcast(t, src))


def all_gather_varlen(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all processes, in rank order.

    The first dimension may differ between processes (uneven shards); the other
    dimensions and the dtype must agree. Padding is used on the wire only, never
    in the result, so no element is duplicated. The result is on ``tensor``'s device,
    whatever device the backend needs on the wire (:func:`wire_device`).
    """
    world = get_world_size()
    if world == 1:
        return tensor
    wire = wire_device(tensor)
    if wire != tensor.device:
        return all_gather_varlen(tensor.to(wire)).to(tensor.device)
    tensor = tensor.contiguous()
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sends each process its slice of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = sizes
        ctx.rank = get_rank()
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded.contiguous())
        return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every process holds a gradient for the whole gathered tensor: the true gradient
        # of one process's slice is the sum over processes.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_varlen`, and gradients flow back to each process's input."""
    world = get_world_size()
    if world == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    return _AllGatherWithGrad.apply(tensor, [int(s.item()) for s in sizes])


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous block of ``range(n)`` this process owns; blocks differ by at most one.

    Concatenating the blocks in rank order gives ``range(n)`` exactly: no padding, no
    duplicates, so every item is processed once.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} process(es): expected 0 <= rank < world_size")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
