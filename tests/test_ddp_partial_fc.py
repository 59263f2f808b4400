"""DDP backbone + Partial FC head across gloo processes: the gradients equal one process's.

Partial FC's loss is the mean over all processes' samples and each process's backward gives
its exact share of the gradient; the fine-tuning program's DDP hook must therefore sum the
backbone's gradients over processes (DDP's default would average them).
"""

import torch
from dist_utils import run_in_processes

from unicom.losses import CombinedMarginLoss, PartialFC
from unicom._training import _allreduce_sum_hook

DIM, CLASSES, BATCH = 8, 7, 12


def _setup():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, DIM)).double()
    x = torch.randn(BATCH, 5, dtype=torch.float64)
    y = torch.randint(CLASSES, (BATCH,))
    return backbone, x, y


def _grads(rank: int, world: int, hook: bool):
    from unicom._distributed import shard_range

    backbone, x, y = _setup()
    torch.manual_seed(1)
    full_centres = torch.normal(0, 0.01, (CLASSES, DIM), dtype=torch.float64)
    model = backbone
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(backbone)
        if hook:
            model.register_comm_hook(None, _allreduce_sum_hook)
    head = PartialFC(CombinedMarginLoss(s=16, m2=0.3), DIM, CLASSES).double()
    with torch.no_grad():
        head.weight.copy_(full_centres[shard_range(CLASSES)])
    rows = shard_range(BATCH)
    loss = head(model(x[rows.start:rows.stop]), y[rows.start:rows.stop])
    loss.backward()
    return [p.grad.clone() for p in backbone.parameters()], head.weight.grad.clone(), loss.detach().item()


def _grads_entry(rank, world, hook):
    return _grads(rank, world, hook)


def test_sum_hook_makes_backbone_gradients_equal_single_process():
    single_backbone, single_centres, single_loss = _grads(0, 1, hook=True)
    results = run_in_processes(_grads_entry, 2, True)
    for backbone, _, loss in results:
        assert abs(loss - single_loss) < 1e-12
        for got, want in zip(backbone, single_backbone):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    centres = torch.cat([r[1] for r in results])
    torch.testing.assert_close(centres, single_centres, rtol=1e-10, atol=1e-12)
    # Without the hook DDP averages: the backbone gradient would be half the true one.
    averaged = run_in_processes(_grads_entry, 2, False)
    torch.testing.assert_close(averaged[0][0][0] * 2, single_backbone[0], rtol=1e-10, atol=1e-12)
