"""The published UNICOM ViT's forward graph, kept as a peer for the benchmarks.

The library's :class:`unicom.VisionTransformer` computes the same function with
``F.scaled_dot_product_attention`` and no precision logic. This module reproduces how the
published module runs, defects included, so that speed and accuracy are compared against what
users of the release get:

* attention is written out: ``softmax(q @ k^T * scale) @ v``, materialising the
  (B, heads, N, N) score matrix, in float32 with autocast switched off;
* every block runs under a hard-coded CUDA float16 autocast (on CUDA inputs only: the
  published ``torch.cuda.amp.autocast`` does nothing to CPU tensors), so the linear layers run
  in float16 whatever the caller asked for;
* the final LayerNorm sees ``x.float()``; the head runs in the caller's precision.

Parameter names match the published checkpoints (and the library's model), so
``PublishedViT(**config).load_state_dict(model.state_dict())`` gives the same weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["PublishedViT"]


def _half_autocast(x: torch.Tensor, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The published ``torch.cuda.amp.autocast(enabled)``: acts on CUDA tensors only."""
    if not x.is_cuda:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        with _half_autocast(x):
            # (B, N, 3D) -> (3, B, heads, N, D/heads)
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        with _half_autocast(x, enabled=False):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, N)
            x = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
        with _half_autocast(x):
            return self.proj(x)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _half_autocast(x):  # hard-coded in the published block
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class PublishedViT(nn.Module):
    """Images (B, 3, input_size, input_size) -> embeddings (B, embedding_size), the published way.

    Evaluation only (no drop path): the benchmarks load trained weights into it.
    """

    def __init__(self, input_size: int = 224, patch_size: int = 32, in_channels: int = 3, dim: int = 768,
                 embedding_size: int = 512, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 **_ignored) -> None:
        super().__init__()
        self.dim = dim
        self.num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.patch_embed = _PatchEmbed(patch_size, in_channels, dim)
        self.blocks = nn.ModuleList([_Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> PublishedViT:
        """A copy of a library :class:`unicom.VisionTransformer` (same weights) as the published graph."""
        model = getattr(model, "_orig_mod", model)
        peer = cls(**model.config.to_dict())
        peer.load_state_dict(model.state_dict())
        return peer.to(next(model.parameters()).device).eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        return x.reshape(B, self.num_patches * self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x))
