"""unicom.distributed: the collectives against plain concatenation and sums, in real gloo
processes, and where each backend needs a tensor on the wire."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_in_processes

from unicom import distributed as dist


def test_single_process_collectives_return_their_input() -> None:
    x = torch.arange(6.0).view(3, 2)
    assert dist.all_gather_varlen(x) is x
    assert torch.equal(dist.all_reduce_sum(x.clone()), x)
    assert dist.wire_device(x) == x.device


@pytest.mark.parametrize(
    "backend,device,expected",
    [
        ("nccl", "cpu", "cuda"),  # NCCL takes CUDA tensors only: CPU ones travel through the GPU
        ("nccl", "meta", "cuda"),
        ("gloo", "cpu", "cpu"),
        ("gloo", "meta", "cpu"),  # any non-CPU tensor (CUDA in practice) goes through the CPU for gloo
        ("mpi", "meta", "meta"),  # others: where the tensor is
        (None, "meta", "meta"),  # no process group
    ],
)
def test_wire_device(backend: str | None, device: str, expected: str) -> None:
    assert dist.wire_device(torch.empty(2, device=device), backend) == torch.device(expected)


def _collectives(rank: int, world_size: int) -> dict:
    rows = rank + 1 if rank != 1 else 0  # uneven shards, one of them empty
    local = torch.arange(rows * 3, dtype=torch.float64).view(rows, 3) + 100 * rank
    strided = torch.arange(2 * rows, dtype=torch.long).view(2, rows).t()  # not contiguous
    counts = torch.tensor([rank, 1])
    returned = dist.all_reduce_sum(counts)
    return {
        "features": dist.all_gather_varlen(local),
        "strided": dist.all_gather_varlen(strided),
        "flags": dist.all_gather_varlen(torch.ones(rows, dtype=torch.bool)),
        "sum": counts,
        "in_place": returned is counts,
    }


def test_collectives_in_gloo_processes_match_concatenation_and_sums() -> None:
    world = 3
    results = run_in_processes(_collectives, world)
    sizes = [1, 0, 3]
    features = torch.cat([torch.arange(n * 3, dtype=torch.float64).view(n, 3) + 100 * r
                          for r, n in enumerate(sizes)])
    strided = torch.cat([torch.arange(2 * n, dtype=torch.long).view(2, n).t() for n in sizes])
    for r in results:  # every process holds the whole, in rank order, nothing padded or repeated
        assert torch.equal(r["features"], features)
        assert torch.equal(r["strided"], strided)
        assert r["flags"].dtype == torch.bool and r["flags"].shape == (4,)
        assert torch.equal(r["sum"], torch.tensor([0 + 1 + 2, world]))
        assert r["in_place"]
