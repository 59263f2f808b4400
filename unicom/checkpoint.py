"""Safe checkpoint loading and saving.

Files are read with ``weights_only=True`` (or as ``.safetensors``) so a tampered file
cannot run code; a file that needs pickled code is refused and never retried unsafely.
A published checkpoint (a bare state dict) gets its architecture from the tensor shapes;
a checkpoint written by :func:`save_model` records its config and loads exactly.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._utils import atomic_write, unwrap_model
from .model import ViTConfig, VisionTransformer

__all__ = ["CheckpointError", "read_checkpoint", "config_from_state_dict", "save_model", "atomic_save"]

logger = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_CONTAINER_KEYS = ("state_dict", "model")  # where training checkpoints keep the weights


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read safely or does not describe a UNICOM model."""


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _check_records(path: Path) -> None:
    """Raise if a record of the zip checkpoint ``path`` fails its CRC-32: ``torch.load`` does
    not check them, so flipped bytes inside a tensor would load silently as other weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}. "
                              "Delete it and download or save it again.") from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: its record {bad} fails its CRC-32 check. "
                              "Delete it and download or save it again.")


def _read_file(path: Path, verify: bool = True) -> tuple[Any, dict[str, str]]:
    """The raw object in ``path`` and any safetensors metadata; ``verify`` checks the CRC-32 of
    every record of a zip checkpoint first (a few seconds per GB)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a valid .safetensors file ({e}); delete it and fetch it again") from e
    if zipfile.is_zipfile(path):
        if verify:
            _check_records(path)
    else:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip archive whose directory (at the end) is missing
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): a zip "
                                  "archive cut short. Delete it and download or save it again.")
        if not head.startswith(b"\x80"):  # torch's legacy format is a pickle (protocol 2+)
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; "
                                  f"it starts with {head!r}): a web page or a Git LFS pointer saved in its place?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to load {path}: it contains pickled Python objects beyond tensors, which could run "
            "arbitrary code. Only plain tensor checkpoints (a state dict) or .safetensors files are accepted. "
            f"If you trust the file, re-save its state dict with torch.save(model.state_dict(), ...). ({e})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}. "
            "Delete it and download or save it again."
        ) from e


def _recorded_config(path: Path, recorded: Any) -> ViTConfig:
    """A config recorded in a checkpoint (a dict, or its JSON text), or a CheckpointError."""
    try:
        values = json.loads(recorded) if isinstance(recorded, str) else recorded
        return ViTConfig(**values)
    except (TypeError, ValueError) as e:  # unknown keys, impossible values, bad JSON
        raise CheckpointError(f"{path} records a config that is not a VisionTransformer's ({e}): "
                              f"{str(recorded)[:200]}") from None


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], ViTConfig | None]:
    """The model state dict in ``path`` (prefixes stripped) and its recorded config, if any.
    ``verify`` checks the CRC-32 of a zip checkpoint's records (skip it for files whose SHA256
    was just checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    obj, metadata = _read_file(path, verify)
    config = None
    if "unicom_config" in metadata:
        config = _recorded_config(path, metadata["unicom_config"])
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        config = _recorded_config(path, obj["config"])
    if isinstance(obj, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return _strip_prefixes(obj), config


def _mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio the model turns back into ``hidden`` (it builds ``int(dim * ratio)`` units: hidden / dim
    can land a rounding error below, e.g. 120 / 88 * 88 = 119.99...)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> ViTConfig:
    """Read the architecture off the tensor shapes of a published-format state dict.

    The number of heads is not visible in the weights; UNICOM uses 64 dimensions per head.
    """
    try:
        dim, in_channels, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
        num_patches = state_dict["pos_embed"].shape[1]
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        embedding_size = state_dict["feature.2.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a UNICOM VisionTransformer state dict: missing {e.args[0]!r}") from None
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise CheckpointError(f"pos_embed has {num_patches} tokens, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    if dim % 64:
        logger.warning("width %d is not a multiple of 64: assuming %d attention head(s) (UNICOM's 64 dimensions "
                       "per head); the weights do not say, and another head count gives other embeddings. Save "
                       "such models with unicom.checkpoint.save_model, which records the config", dim,
                       max(dim // 64, 1))
    return ViTConfig(
        input_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        dim=dim,
        embedding_size=embedding_size,
        depth=depth,
        num_heads=max(dim // 64, 1),
        mlp_ratio=_mlp_ratio(hidden, dim),
    )


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` whole or not at all (see :func:`unicom._utils.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Save weights and config so that ``unicom.load(path)`` rebuilds the model exactly.

    A ``.safetensors`` suffix writes safetensors (config in its metadata); anything
    else writes a ``torch.save`` file holding ``{"config": ..., "state_dict": ...}``.
    """
    model = unwrap_model(model)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state_dict, metadata={"unicom_config": json.dumps(config)})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_save({"config": config, "state_dict": state_dict}, path)
