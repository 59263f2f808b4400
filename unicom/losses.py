"""Margin softmax losses and Partial FC, the classification head used for fine-tuning.

:class:`CombinedMarginLoss` turns cosines into margin logits (ArcFace, CosFace and their
combination). :class:`PartialFC` holds this process's shard of the class centres (model
parallel), gathers every process's embeddings, optionally samples centres and embedding
dimensions, and computes a softmax cross-entropy whose denominator is reduced across
processes. Both work unchanged in a single process without a process group.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unicom import _distributed as distributed

__all__ = ["MARGIN_GRADIENTS", "CombinedMarginLoss", "PartialFC"]


MARGIN_GRADIENTS = ("straight-through", "exact")


class CombinedMarginLoss(nn.Module):
    """Combined margin softmax logits: ``s * (cos(m1 * theta + m2) - m3)`` for the true class.

    ArcFace is ``m1=1, m2>0, m3=0``; CosFace is ``m1=1, m2=0, m3>0``. The other logits stay
    ``s * cos(theta)``.

    ``gradient`` says how the margin is differentiated:

    - ``"straight-through"`` (default, as the published training and insightface's
      ``CombinedMarginLoss``, which apply the margin in place under ``no_grad``): the true-class
      logit has the margin's value but the gradient of ``s * cos(theta)``, i.e. the softmax
      gradient flows to the cosine unchanged. This is what the published numbers were trained
      with. The value is ``cos(m1 * theta + m2) - m3`` at every angle, as published.
    - ``"exact"``: the true derivative of the margin logit, ``sin(m1*theta + m2) / sin(theta)``
      times ``m1`` with respect to the cosine (1.5 to 1.8 times larger at the angles of a
      trained model with ``m2`` 0.3). Beyond ``theta* = (pi - m2) / m1`` the angle
      ``m1 * theta + m2`` passes pi and ``cos(m1 * theta + m2)`` would *increase* with theta,
      pushing the worst samples further away; there the target logit continues as
      ``cos(theta) - cos(theta*) - 1 - m3``: an additive cosine margin that meets the angular
      branch at ``theta*`` (continuous, differentiable almost everywhere) and keeps decreasing
      with theta. (insightface's ``ArcFace`` head has a similar ``cos - m*sin(m)`` fallback with
      a jump at ``theta*``.)

    The pure CosFace case (``m1=1, m2=0``) is the same in both modes and skips ``acos``.
    Numerics: cosines are clamped into ``[-1 + eps, 1 - eps]`` (``eps`` the dtype's machine
    epsilon) before ``acos``, so the gradient stays finite when a cosine is exactly 1 or -1.
    """

    def __init__(self, s: float = 32.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.0,
                 gradient: str = "straight-through") -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        if m1 <= 0:
            raise ValueError(f"multiplicative margin m1 must be positive, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"additive angular margin m2 must be in [0, pi), got {m2}")
        if gradient not in MARGIN_GRADIENTS:
            raise ValueError(f"gradient must be one of {MARGIN_GRADIENTS}, got {gradient!r}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.gradient = gradient
        # The angle past which cos(m1*theta + m2) stops decreasing; >= pi means never.
        self.theta_max = (math.pi - self.m2) / self.m1

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, gradient={self.gradient!r}"

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """The unscaled true-class logit for cosines ``cos`` (any shape)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        if self.gradient == "straight-through":
            with torch.no_grad():
                theta = torch.acos(cos.clamp(-1.0, 1.0))
                shift = torch.cos(self.m1 * theta + self.m2) - self.m3 - cos
            return cos + shift  # the margin's value, the cosine's gradient
        eps = torch.finfo(cos.dtype).eps
        theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
        margin = torch.cos(self.m1 * theta + self.m2)
        if self.theta_max < math.pi:
            fallback = cos - (math.cos(self.theta_max) + 1.0)
            margin = torch.where(theta <= self.theta_max, margin, fallback)
        return margin - self.m3

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin logits from cosines.

        Args:
            logits: cosines, (N, C_local).
            labels: (N,) the local column of each row's true class, or -1 when the true
                class is not among these columns (it lives on another process).

        Returns:
            (N, C_local) scaled logits; a new tensor, ``logits`` is left untouched.
        """
        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]  # (P,)
        cols = labels[rows].long()  # (P,)
        target = self.target_logit(logits[rows, cols])  # (P,)
        # Out-of-place so autograd sees both the untouched cosines and the new targets.
        return logits.index_put((rows, cols), target) * self.s


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits whose columns are split across processes.

    Forward: the row max (for stability) and the exp-sum are reduced across processes, and
    the true-class logit comes from the one process holding that column. Backward returns
    the exact gradient with respect to this process's columns, ``(softmax - onehot) / N``,
    with no communication: each process owns its columns' gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = logits.shape[0]
        multi = distributed.get_world_size() > 1
        row_max = logits.amax(dim=1)  # (N,) no gradient: the loss does not depend on it
        if multi:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max[:, None])  # (N, C_local)
        sum_exp = distributed.all_reduce_sum(exp.sum(dim=1))  # (N,)

        rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
        cols = labels[rows]
        target = logits.new_zeros(n)  # (N,) true-class logit minus the max, 0 elsewhere
        target[rows] = logits[rows, cols] - row_max[rows]
        distributed.all_reduce_sum(target)

        # -log softmax of the target, written so it never takes the log of a tiny probability.
        loss = (torch.log(sum_exp) - target).mean()
        prob = exp.div_(sum_exp[:, None])  # (N, C_local), reuses the exp buffer
        ctx.save_for_backward(prob, rows, cols)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        prob, rows, cols = ctx.saved_tensors
        grad = prob.clone()
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss / prob.shape[0])
        return grad, None


class PartialFC(nn.Module):
    """Model-parallel margin softmax head (Partial FC) holding this process's class centres.

    The ``num_classes`` centres are split into contiguous blocks over the processes
    (:func:`unicom._distributed.shard_range`); ``weight`` is this process's block,
    (num_local, embedding_size), and ``class_start`` its first global class. Build the
    module after the process group exists.

    Each step (``forward``):

    1. gathers all processes' embeddings (with gradient) and labels;
    2. with ``num_feat < embedding_size``, picks one random subset of ``num_feat``
       dimensions for embeddings and centres. Rank 0 draws it from its global torch RNG
       (``torch.randperm`` on the weight's device) and broadcasts it, so all processes use
       the same subset and a run seeded like a single process draws the same one;
    3. with ``sample_rate < 1``, keeps every centre of this shard whose class occurs in the
       gathered labels plus a uniform random subset of the other centres (this process's
       RNG), ``ceil(sample_rate * num_local)`` in all, or all the positives when there are
       more of them;
    4. computes cosines between normalised embeddings and centres and applies
       ``margin_loss``;
    5. returns the mean cross-entropy over every process's samples, the same value on each
       process, with the softmax denominator reduced across processes.

    Gradients are exact: each process gets its own embeddings' gradient and the gradient of
    its centres. The cosine matmul runs in whatever precision the caller chose (e.g. under
    autocast); everything after it is at least float32. Labels must lie in
    ``[0, num_classes)``. After a step, ``last_sampled`` holds the local indices of the
    centres used (sorted) and ``last_feat`` the dimensions used (sorted) or None.

    Do not wrap this module in DistributedDataParallel: each process's centres are its own.
    Each process's backward yields its exact share of the gradient of the global loss, so the
    backbone's gradients must be *summed* over processes (DDP's default averages them; the
    fine-tuning program installs a summing communication hook).
    """

    def __init__(
        self,
        margin_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        num_feat: int | None = None,
    ) -> None:
        super().__init__()
        if embedding_size <= 0:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if num_feat is not None and not 0 < num_feat <= embedding_size:
            raise ValueError(f"num_feat must be in (0, embedding_size={embedding_size}], got {num_feat}")
        world = distributed.get_world_size()
        if num_classes < world:
            raise ValueError(f"num_classes ({num_classes}) must be at least the world size ({world})")
        shard = distributed.shard_range(num_classes)
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.num_feat = num_feat
        self.class_start = shard.start
        self.num_local = len(shard)
        # round() first so that e.g. 0.7 * 10 = 7.000000000000001 does not become 8.
        self.num_sample = min(self.num_local, max(1, math.ceil(round(self.sample_rate * self.num_local, 6))))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        self.last_sampled: torch.Tensor | None = None
        self.last_feat: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_start + self.num_local}), "
            f"sample_rate={self.sample_rate}, num_feat={self.num_feat}"
        )

    def _select_features(self) -> torch.Tensor | None:
        """(num_feat,) sorted dimensions for this step, identical on every process."""
        if self.num_feat is None or self.num_feat == self.embedding_size:
            return None
        device = self.weight.device
        if distributed.get_rank() == 0:
            feat = torch.randperm(self.embedding_size, device=device)[: self.num_feat]
        else:
            feat = torch.empty(self.num_feat, dtype=torch.long, device=device)
        if distributed.get_world_size() > 1:
            dist.broadcast(feat, src=0)
        return feat.sort().values

    def _sample_centres(self, local_labels: torch.Tensor) -> torch.Tensor:
        """(num_used,) sorted local indices of the centres used this step.

        ``local_labels`` (N,) are the gathered labels relative to this shard; entries outside
        ``[0, num_local)`` belong to other processes.
        """
        device = self.weight.device
        if self.num_sample >= self.num_local:
            return torch.arange(self.num_local, device=device)
        mine = (local_labels >= 0) & (local_labels < self.num_local)
        positives = torch.unique(local_labels[mine])  # sorted
        if positives.numel() >= self.num_sample:
            return positives
        # Random scores, positives forced to the top: the top num_sample are all positives
        # plus a uniformly random subset of the negatives.
        score = torch.rand(self.num_local, device=device)
        score[positives] = 2.0
        return torch.topk(score, self.num_sample, sorted=False).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax cross-entropy over all processes' samples.

        Args:
            embeddings: (B_local, embedding_size) this process's embeddings (not normalised).
            labels: (B_local,) global class indices in ``[0, num_classes)``.

        Returns:
            Scalar loss, identical on every process.
        """
        labels = labels.reshape(-1).long()
        # An out-of-range label would silently count as "no centre here" on every process (a wrong
        # loss, no error). Checked on the device without waiting for it: a RuntimeError on the
        # CPU, a device-side assertion (which ends the process) on CUDA.
        torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                            f"PartialFC: labels must lie in [0, {self.num_classes})")
        # Float32 at least: the softmax must not run in half precision (mixed precision).
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32)
        emb = distributed.all_gather_with_grad(embeddings.to(dtype))  # (N, D)
        local_labels = distributed.all_gather_varlen(labels) - self.class_start  # (N,)

        feat = self._select_features()
        sampled = self._sample_centres(local_labels)  # (S,)
        self.last_feat, self.last_sampled = feat, sampled

        weight = self.weight  # (num_local, D)
        if sampled.numel() < self.num_local:
            weight = weight[sampled]  # (S, D); gradient lands in the sampled rows only
            # Column of each local class among the sampled ones, -1 when not sampled.
            remap = torch.full((self.num_local,), -1, dtype=torch.long, device=sampled.device)
            remap[sampled] = torch.arange(sampled.numel(), device=sampled.device)
        if feat is not None:
            emb = emb[:, feat]  # (N, F)
            weight = weight[:, feat]  # (S, F)

        mine = (local_labels >= 0) & (local_labels < self.num_local)
        if sampled.numel() < self.num_local:
            target = torch.where(mine, remap[local_labels.clamp(0, self.num_local - 1)], -1)
        else:
            target = torch.where(mine, local_labels, -1)  # (N,) local column or -1

        cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight.to(dtype), dim=1))  # (N, S)
        logits = self.margin_loss(cos.to(dtype), target)
        return _DistCrossEntropy.apply(logits.to(dtype), target)
