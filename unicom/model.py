"""The UNICOM Vision Transformer.

A plain pre-norm ViT without a class token whose head flattens *all* tokens and maps
them to the embedding through two Linear + BatchNorm1d pairs. The input size is
therefore fixed per model. Parameter names match the published checkpoints exactly,
so their state dicts load with ``strict=True``.

The module knows nothing of devices or precision: the caller moves and casts it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ViTConfig", "VisionTransformer"]


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to build a :class:`VisionTransformer` (the published keyword names)."""

    input_size: int = 224
    patch_size: int = 32
    in_channels: int = 3
    dim: int = 768
    embedding_size: int = 512
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "dim", "embedding_size", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        ratio, rate = self.mlp_ratio, self.drop_path_rate
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
            raise ValueError(f"mlp_ratio must be a finite number > 0, got {ratio!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def check_images(x: torch.Tensor, config: ViTConfig) -> None:
    """A ValueError unless ``x`` is a batch of images of the size ``config`` takes."""
    expected = config.input_size
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (B, {config.in_channels}, {expected}, {expected}), "
                         f"got a tensor of shape {tuple(x.shape)} (one image: add a batch dimension, x[None])")
    if x.shape[1] != config.in_channels or x.shape[-2:] != (expected, expected):
        raise ValueError(f"expected images of {expected}x{expected} with {config.in_channels} channels, got "
                         f"{x.shape[2]}x{x.shape[3]} with {x.shape[1]}")


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, D, H/p, W/p) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D/heads)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        # Registration order (norms first) follows the published state-dict order.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """UNICOM ViT: images (B, 3, input_size, input_size) -> embeddings (B, embedding_size).

    The embedding is not L2-normalised; retrieval and kNN normalise it.
    """

    def __init__(
        self,
        input_size: int = 224,
        patch_size: int = 32,
        in_channels: int = 3,
        dim: int = 768,
        embedding_size: int = 512,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        cfg = ViTConfig(input_size, patch_size, in_channels, dim, embedding_size, depth, num_heads, mlp_ratio,
                        drop_path_rate)
        self.config = cfg
        self.grad_checkpointing = False
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dim))
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth rises linearly
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(cfg.num_patches * dim, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: ViTConfig) -> VisionTransformer:
        return cls(**config.to_dict())

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                m.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: less memory for the large models."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> flattened normalised tokens (B, num_patches * dim)."""
        check_images(x, self.config)
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x))
