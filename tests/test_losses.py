"""CombinedMarginLoss and PartialFC against brute-force float64 margin softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_in_processes
from unicom._distributed import shard_range
from unicom.losses import CombinedMarginLoss, PartialFC

MARGINS = {
    "arcface": dict(s=32.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(s=32.0, m1=1.0, m2=0.0, m3=0.35),
    "combined": dict(s=16.0, m1=0.9, m2=0.3, m3=0.2),
}


def brute_force(
    emb: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    classes: torch.Tensor | None = None,
    feat: torch.Tensor | None = None,
    gradient: str = "straight-through",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients (embeddings, full weight) of the margin softmax, in float64.

    Only the centres ``classes`` (global indices; default all) and the dimensions ``feat``
    (default all) take part; the other rows of the weight get a zero gradient. With
    ``gradient="straight-through"`` the margin is a constant added to the true-class cosine.
    """
    emb = emb.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    e, w = emb, weight
    if feat is not None:
        e, w = e[:, feat], w[:, feat]
    if classes is not None:
        w = w[classes]
        labels = torch.searchsorted(classes, labels)
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).T
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    angle = m1 * torch.acos(cos.clamp(-1.0, 1.0)) + m2  # 1 + 1 ulp from rounding is 1
    assert (angle[onehot] < math.pi).all(), "test data must stay clear of the fallback"
    target = torch.cos(angle) - m3
    if gradient == "straight-through":
        target = cos + (target - cos).detach()
    logits = s * torch.where(onehot, target, cos)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def make_data(n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    # Pull each embedding towards its centre so the true class is not hopeless.
    emb = emb + 0.5 * weight[labels]
    return emb, weight, labels


def run_pfc(
    pfc: PartialFC, emb: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    emb = emb.clone().requires_grad_()
    pfc.zero_grad()
    loss = pfc(emb, labels)
    loss.backward()
    return loss.detach(), emb.grad, pfc.weight.grad


# --- CombinedMarginLoss ---------------------------------------------------------------


@pytest.mark.parametrize("name", MARGINS)
def test_margin_loss_matches_brute_force(name: str) -> None:
    cfg = MARGINS[name]
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.6 - 0.8  # inside (-0.8, 0.8)
    labels = torch.tensor([0, 4, -1, 2, 2, -1])
    out = CombinedMarginLoss(**cfg)(cos, labels)

    expected = cfg["s"] * cos.clone()
    for i, y in enumerate(labels.tolist()):
        if y >= 0:
            theta = math.acos(cos[i, y].item())
            expected[i, y] = cfg["s"] * (math.cos(cfg["m1"] * theta + cfg["m2"]) - cfg["m3"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", MARGINS)
def test_margin_loss_gradcheck(name: str) -> None:
    cos = (torch.rand(4, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([1, -1, 0, 2])
    assert torch.autograd.gradcheck(lambda x: CombinedMarginLoss(**MARGINS[name], gradient="exact")(x, labels),
                                    (cos,))


@pytest.mark.parametrize("name", MARGINS)
def test_margin_loss_straight_through_gradient_is_the_cosines(name: str) -> None:
    """As published: the margin changes the logit's value, and d(logit)/d(cos) is s for every entry."""
    cos = (torch.rand(4, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([1, -1, 0, 2])
    weights = torch.rand(4, 3, dtype=torch.float64)
    straight = CombinedMarginLoss(**MARGINS[name])
    out = straight(cos, labels)
    (out * weights).sum().backward()
    torch.testing.assert_close(cos.grad, MARGINS[name]["s"] * weights, rtol=0, atol=0)
    torch.testing.assert_close(out, CombinedMarginLoss(**MARGINS[name], gradient="exact")(cos, labels),
                               rtol=0, atol=1e-12)  # the same values where the exact mode has no fallback


def test_margin_loss_straight_through_value_is_the_published_one_at_every_angle() -> None:
    loss = CombinedMarginLoss(s=1.0, m1=1.0, m2=0.5, m3=0.1)
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    torch.testing.assert_close(loss.target_logit(torch.cos(theta)), torch.cos(theta + 0.5) - 0.1)


def reference_target_logit(cos: torch.Tensor, m1: float, m2: float, m3: float, gradient: str,
                           eps: float) -> torch.Tensor:
    """The true-class logit as CombinedMarginLoss documents it, in float64 (before the scale s).

    straight-through: the value cos(m1 * theta + m2) - m3 (cosine clamped into [-1, 1]) with the
    gradient of the cosine. exact: autograd through cos(m1 * theta + m2) - m3, theta = acos of the
    cosine clamped into [-1 + eps, 1 - eps]; past theta* = (pi - m2) / m1 the logit continues as
    cos(theta) - cos(theta*) - 1 - m3.
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3
    if gradient == "straight-through":
        value = torch.cos(m1 * torch.acos(cos.clamp(-1.0, 1.0)) + m2) - m3
        return cos + (value - cos).detach()
    theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
    theta_max = (math.pi - m2) / m1
    logit = torch.cos(m1 * theta + m2)
    if theta_max < math.pi:
        logit = torch.where(theta <= theta_max, logit, cos - math.cos(theta_max) - 1.0)
    return logit - m3


# Tolerances against the float64 reference, relative to the scale s.
EDGE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 4e-3}


@pytest.mark.parametrize("gradient", ["straight-through", "exact"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("name", MARGINS)
def test_margin_loss_at_plus_minus_one_matches_reference(name: str, dtype: torch.dtype, gradient: str) -> None:
    """Values and gradients where acos has an infinite slope (true-class cosine exactly 1 or -1),
    and at interior cosines, in every dtype, against the documented formula in float64."""
    cfg = MARGINS[name]
    rows = [[1.0, 0.2], [-1.0, 0.3], [0.1, 1.0], [0.5, -1.0], [0.625, 0.125], [0.25, -0.75]]
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    cos = torch.tensor(rows, dtype=dtype, requires_grad=True)
    weights = torch.linspace(0.5, 1.5, cos.numel(), dtype=torch.float64).view(cos.shape)  # distinct per entry
    out = CombinedMarginLoss(**cfg, gradient=gradient)(cos, labels)
    (out * weights.to(dtype)).sum().backward()

    ref_cos = cos.detach().double().requires_grad_()
    onehot = F.one_hot(labels, 2).bool()
    target = reference_target_logit(ref_cos, cfg["m1"], cfg["m2"], cfg["m3"], gradient, torch.finfo(dtype).eps)
    ref = cfg["s"] * torch.where(onehot, target, ref_cos)
    (ref * weights).sum().backward()
    tol = EDGE_TOLERANCE[dtype] * cfg["s"]
    assert out.dtype == dtype and torch.isfinite(cos.grad).all()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=tol)
    torch.testing.assert_close(cos.grad.double(), ref_cos.grad, rtol=EDGE_TOLERANCE[dtype] * 4, atol=tol)


def test_margin_loss_fallback_is_continuous_and_decreasing() -> None:
    loss = CombinedMarginLoss(s=1.0, m1=1.0, m2=0.5, m3=0.1, gradient="exact")
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    target = loss.target_logit(torch.cos(theta))
    assert (target.diff() < 0).all(), "target logit must decrease with the angle"
    assert target.diff().abs().max() < 1e-2, "no jump anywhere"
    # The documented formulas on either side of theta* = pi - m2.
    inside = theta < math.pi - 0.5
    torch.testing.assert_close(target[inside], torch.cos(theta[inside] + 0.5) - 0.1)
    tail = theta[~inside]
    torch.testing.assert_close(target[~inside], torch.cos(tail) - math.cos(math.pi - 0.5) - 1.0 - 0.1)


def test_margin_loss_does_not_modify_input() -> None:
    cos = torch.tensor([[0.3, 0.4]])
    before = cos.clone()
    CombinedMarginLoss()(cos, torch.tensor([1]))
    assert torch.equal(cos, before)


def test_margin_loss_validation() -> None:
    with pytest.raises(ValueError):
        CombinedMarginLoss(s=0.0)
    with pytest.raises(ValueError):
        CombinedMarginLoss(m1=0.0)
    with pytest.raises(ValueError):
        CombinedMarginLoss(m2=-0.1)
    with pytest.raises(ValueError, match="straight-through"):
        CombinedMarginLoss(gradient="approximate")


# --- PartialFC, one process -----------------------------------------------------------


@pytest.mark.parametrize("gradient", ["straight-through", "exact"])
@pytest.mark.parametrize("name", MARGINS)
def test_partial_fc_matches_brute_force(name: str, gradient: str) -> None:
    cfg = MARGINS[name]
    emb, weight, labels = make_data(n=12, d=8, c=10)
    pfc = PartialFC(CombinedMarginLoss(**cfg, gradient=gradient), embedding_size=8, num_classes=10).double()
    pfc.weight.data.copy_(weight)
    loss, g_emb, g_w = run_pfc(pfc, emb, labels)
    ref_loss, ref_emb, ref_w = brute_force(emb, weight, labels, **cfg, gradient=gradient)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_emb, ref_emb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-10, atol=1e-12)
    assert torch.equal(pfc.last_sampled, torch.arange(10))
    assert pfc.last_feat is None


def test_partial_fc_sampling_matches_brute_force_over_sampled_classes() -> None:
    cfg = MARGINS["arcface"]
    emb, weight, labels = make_data(n=6, d=8, c=40, seed=2)
    pfc = PartialFC(CombinedMarginLoss(**cfg), 8, 40, sample_rate=0.3).double()
    pfc.weight.data.copy_(weight)
    loss, g_emb, g_w = run_pfc(pfc, emb, labels)
    sampled = pfc.last_sampled
    assert sampled.numel() == 12  # ceil(0.3 * 40)
    assert set(labels.tolist()) <= set(sampled.tolist())
    assert torch.equal(sampled, sampled.unique())
    ref_loss, ref_emb, ref_w = brute_force(emb, weight, labels, **cfg, classes=sampled)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_emb, ref_emb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-10, atol=1e-12)
    unsampled = torch.ones(40, dtype=torch.bool)
    unsampled[sampled] = False
    assert (g_w[unsampled] == 0).all()


def test_partial_fc_sampling_keeps_all_positives_beyond_the_budget() -> None:
    emb, weight, labels = make_data(n=8, d=4, c=20, seed=3)
    labels = torch.arange(8)  # 8 positives, budget ceil(0.1 * 20) = 2
    pfc = PartialFC(CombinedMarginLoss(), 4, 20, sample_rate=0.1)
    pfc(emb.float(), labels)
    assert torch.equal(pfc.last_sampled, torch.arange(8))


def test_partial_fc_sample_count_rounding() -> None:
    # 0.7 * 10 is 7.000000000000001 in floating point; the budget must still be 7.
    assert PartialFC(CombinedMarginLoss(), 4, 10, sample_rate=0.7).num_sample == 7
    assert PartialFC(CombinedMarginLoss(), 4, 10, sample_rate=0.71).num_sample == 8
    assert PartialFC(CombinedMarginLoss(), 4, 10, sample_rate=1e-6).num_sample == 1


def test_partial_fc_negatives_are_uniform() -> None:
    torch.manual_seed(0)
    pfc = PartialFC(CombinedMarginLoss(), 4, 20, sample_rate=0.4)  # 8 of 20 centres
    emb = torch.randn(3, 4)
    labels = torch.tensor([3, 3, 11])  # 2 positives, so 6 of the 18 negatives per step
    steps = 1500
    counts = torch.zeros(20)
    with torch.no_grad():
        for _ in range(steps):
            pfc(emb, labels)
            assert pfc.last_sampled.numel() == 8
            counts[pfc.last_sampled] += 1
    assert counts[3] == steps and counts[11] == steps
    negatives = counts[[i for i in range(20) if i not in (3, 11)]]
    expected = steps * 6 / 18  # 500, binomial sd about 18
    assert (negatives - expected).abs().max() < 90, negatives


def test_partial_fc_num_feat_matches_brute_force_on_selected_dims() -> None:
    cfg = MARGINS["arcface"]
    emb, weight, labels = make_data(n=10, d=16, c=7, seed=4)
    pfc = PartialFC(CombinedMarginLoss(**cfg), 16, 7, num_feat=5).double()
    pfc.weight.data.copy_(weight)
    torch.manual_seed(5)
    loss, g_emb, g_w = run_pfc(pfc, emb, labels)
    feat = pfc.last_feat
    assert feat.numel() == 5 and torch.equal(feat, feat.unique())
    ref_loss, ref_emb, ref_w = brute_force(emb, weight, labels, **cfg, feat=feat)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_emb, ref_emb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-10, atol=1e-12)
    other = torch.ones(16, dtype=torch.bool)
    other[feat] = False
    assert (g_emb[:, other] == 0).all() and (g_w[:, other] == 0).all()
    # A new subset each step.
    pfc(emb, labels)
    assert not torch.equal(pfc.last_feat, feat)


def test_partial_fc_num_feat_equal_to_embedding_size_uses_all_dims() -> None:
    pfc = PartialFC(CombinedMarginLoss(), 8, 5, num_feat=8)
    pfc(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    assert pfc.last_feat is None


def test_partial_fc_half_embeddings_compute_in_float32() -> None:
    cfg = MARGINS["arcface"]
    emb, weight, labels = make_data(n=8, d=8, c=6, seed=6)
    emb16 = emb.half()
    pfc = PartialFC(CombinedMarginLoss(**cfg), 8, 6)
    pfc.weight.data.copy_(weight)
    loss, g_emb, g_w = run_pfc(pfc, emb16, labels)
    assert loss.dtype == torch.float32 and g_emb.dtype == torch.float16
    ref_loss, ref_emb, ref_w = brute_force(emb16, weight.float(), labels, **cfg)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_emb.double(), ref_emb, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(g_w.double(), ref_w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_partial_fc_when_embedding_is_its_centre_matches_brute_force(dtype: torch.dtype) -> None:
    """cos = 1 (and 1 + 1 ulp after normalising) for the true class, -1 for a wrong one: the
    published (straight-through, default) loss and its gradients, against float64."""
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    emb = torch.stack([weight[0], -weight[1], 3 * weight[2]])  # cos = 1, -1 (wrong class), 1
    labels = torch.tensor([0, 2, 2])
    pfc = PartialFC(CombinedMarginLoss(), 6, 4).to(dtype)
    pfc.weight.data.copy_(weight)
    loss, g_emb, g_w = run_pfc(pfc, emb, labels)
    ref_loss, ref_emb, ref_w = brute_force(emb, weight, labels, s=32.0, m1=1.0, m2=0.3, m3=0.0)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    assert loss.dtype == g_emb.dtype == g_w.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_emb.double(), ref_emb, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_w.double(), ref_w, rtol=rtol, atol=atol)


def test_partial_fc_init_and_validation() -> None:
    pfc = PartialFC(CombinedMarginLoss(), 64, 1000)
    assert pfc.weight.shape == (1000, 64)
    assert abs(pfc.weight.std().item() - 0.01) < 1e-3
    for kwargs in (dict(sample_rate=0.0), dict(sample_rate=1.5), dict(num_feat=0), dict(num_feat=65)):
        with pytest.raises(ValueError):
            PartialFC(CombinedMarginLoss(), 64, 1000, **kwargs)


@pytest.mark.parametrize("bad", [-1, 10])
def test_partial_fc_rejects_labels_out_of_range(bad: int) -> None:
    pfc = PartialFC(CombinedMarginLoss(), 8, 10)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 10\)"):
        pfc(torch.randn(3, 8), torch.tensor([0, bad, 9]))
    emb, labels = torch.randn(3, 8), torch.tensor([0, 5, 9])  # the limits themselves are valid
    ref_loss = brute_force(emb, pfc.weight, labels, s=32.0, m1=1.0, m2=0.3, m3=0.0)[0]
    torch.testing.assert_close(pfc(emb, labels).double(), ref_loss, rtol=1e-5, atol=1e-6)


# --- PartialFC, several processes -----------------------------------------------------

# (world size, local batch sizes): uneven, one rank even without samples.
WORLDS = [(2, [5, 2]), (3, [3, 0, 4])]
NUM_CLASSES = 11  # not divisible by 2 or 3
DIM = 8
NUM_FEAT = 5
SEED = 7


def _rank_work(rank: int, world_size: int, sizes: list[int], emb, weight, labels) -> dict:
    """One process's share of the checks: several cases in one spawn to keep tests fast."""
    cfg = MARGINS["arcface"]
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    shard = shard_range(NUM_CLASSES)
    out = {"shard": (shard.start, shard.stop)}
    cases = {"full": {}, "num_feat": dict(num_feat=NUM_FEAT), "sampled": dict(sample_rate=0.5)}
    for case, kwargs in cases.items():
        pfc = PartialFC(CombinedMarginLoss(**cfg), DIM, NUM_CLASSES, **kwargs).double()
        pfc.weight.data.copy_(weight[shard.start : shard.stop])
        # The same seed everywhere: rank 0 then draws the feature subset a single process would.
        torch.manual_seed(SEED + rank if case == "sampled" else SEED)
        loss, g_emb, g_w = run_pfc(pfc, emb[mine], labels[mine])
        out[case] = dict(loss=loss, g_emb=g_emb, g_w=g_w, sampled=pfc.last_sampled + shard.start, feat=pfc.last_feat)
    return out


@pytest.mark.parametrize("world_size,sizes", WORLDS)
def test_partial_fc_multi_process_matches_single_process(world_size: int, sizes: list[int]) -> None:
    emb, weight, labels = make_data(n=sum(sizes), d=DIM, c=NUM_CLASSES, seed=8)
    results = run_in_processes(_rank_work, world_size, sizes, emb, weight, labels)

    shards = [r["shard"] for r in results]
    assert shards[0][0] == 0 and shards[-1][1] == NUM_CLASSES
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))

    cfg = MARGINS["arcface"]
    for case, kwargs in (("full", {}), ("num_feat", dict(num_feat=NUM_FEAT))):
        single = PartialFC(CombinedMarginLoss(**cfg), DIM, NUM_CLASSES, **kwargs).double()
        single.weight.data.copy_(weight)
        torch.manual_seed(SEED)
        ref = run_pfc(single, emb, labels)
        for r in results:  # the same loss on every process
            torch.testing.assert_close(r[case]["loss"], ref[0], rtol=1e-12, atol=0)
            if case == "num_feat":
                assert torch.equal(r[case]["feat"], single.last_feat)
        g_emb = torch.cat([r[case]["g_emb"] for r in results])
        g_w = torch.cat([r[case]["g_w"] for r in results])
        torch.testing.assert_close(g_emb, ref[1], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(g_w, ref[2], rtol=1e-10, atol=1e-13)

    # Sampling: each shard keeps its positives and its budget; the loss is the brute force
    # over the union of the sampled centres.
    sampled = []
    for (lo, hi), r in zip(shards, results):
        s = r["sampled"]["sampled"]
        positives = {y for y in labels.tolist() if lo <= y < hi}
        assert positives <= set(s.tolist())
        assert s.numel() == max(len(positives), math.ceil(0.5 * (hi - lo)))
        sampled.append(s)
    sampled = torch.cat(sampled)
    ref_loss, ref_emb, ref_w = brute_force(emb, weight, labels, **cfg, classes=sampled)
    for r in results:
        torch.testing.assert_close(r["sampled"]["loss"], ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat([r["sampled"]["g_emb"] for r in results]), ref_emb, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(torch.cat([r["sampled"]["g_w"] for r in results]), ref_w, rtol=1e-10, atol=1e-13)


# --- the multi-process helper itself --------------------------------------------------


def _env_work(rank: int, world_size: int) -> tuple:
    import os

    import torch.distributed as dist

    return rank, os.environ["RANK"], os.environ["WORLD_SIZE"], dist.is_initialized()


def _failing_work(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    return rank


def test_run_in_processes_without_group_sets_torchrun_variables() -> None:
    results = run_in_processes(_env_work, 2, init=False)
    assert results == [(0, "0", "2", False), (1, "1", "2", False)]


def test_run_in_processes_reports_the_failing_rank() -> None:
    with pytest.raises(RuntimeError, match="rank one fails on purpose"):
        run_in_processes(_failing_work, 2)
