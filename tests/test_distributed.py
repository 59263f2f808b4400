"""unicom._distributed: the collectives against plain concatenation and sums, in real gloo
processes, and where each backend needs a tensor on the wire."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_in_processes

from unicom import _distributed as dist


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
    """Everything the module checks in processes, in one spawn (each costs about a second)."""
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
        "with_grad": _gather_with_grad(rank),
    }


WORLD = 3


@pytest.fixture(scope="module")
def gloo_results() -> list[dict]:
    return run_in_processes(_collectives, WORLD)


def test_collectives_in_gloo_processes_match_concatenation_and_sums(gloo_results: list[dict]) -> None:
    world = WORLD
    results = gloo_results
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


# Local row counts of the gather-with-grad cases: every offset differs from the rank times a
# size, and one process may hold no rows.
GRAD_CASES = ([3, 1, 2], [2, 0, 3])


def _local_rows(sizes: list[int], rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 * rank + sum(sizes))
    return torch.randn(sizes[rank], 4, generator=g, dtype=torch.float64)


def _loss_weights(rank: int, total: int) -> torch.Tensor:
    """Each process's loss weighs the gathered rows differently: each row's gradient is a sum
    over processes that no process could compute alone."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(total, 4, generator=g, dtype=torch.float64) + 0.1


def _gather_with_grad(rank: int) -> list[dict]:
    results = []
    for sizes in GRAD_CASES:
        x = _local_rows(sizes, rank).requires_grad_()
        gathered = dist.all_gather_with_grad(x)
        (_loss_weights(rank, sum(sizes)) * gathered.square()).sum().backward()
        results.append({"gathered": gathered.detach(), "grad": x.grad})
    return results


def test_all_gather_with_grad_sends_each_process_its_slice_of_the_summed_gradient(gloo_results: list[dict]) -> None:
    world = WORLD
    results = [r["with_grad"] for r in gloo_results]
    for case, sizes in enumerate(GRAD_CASES):
        # Single-process float64 reference: the sum of every process's loss over the concatenation.
        whole = torch.cat([_local_rows(sizes, r) for r in range(world)]).requires_grad_()
        sum((_loss_weights(r, sum(sizes)) * whole.square()).sum() for r in range(world)).backward()
        grads = whole.grad.split(sizes)
        for rank, r in enumerate(results):
            assert torch.equal(r[case]["gathered"], whole.detach())
            grad = r[case]["grad"]
            if sizes[rank] == 0:  # autograd may leave an empty input's gradient unset
                assert grad is None or grad.shape == (0, 4)
                continue
            torch.testing.assert_close(grad, grads[rank], rtol=1e-12, atol=0)


def test_single_process_gather_with_grad_is_the_identity() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
