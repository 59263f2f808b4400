"""Building models (never touches the network) and loading published or local weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ._utils import PRECISIONS
from .checkpoint import CheckpointError, config_from_state_dict, mismatch, read_checkpoint
from .model import ViTConfig, VisionTransformer
from ._pretrained import REGISTRY, get_pretrained, unknown_model_message
from .transforms import eval_transform

__all__ = ["create_model", "load", "PRECISIONS"]

logger = logging.getLogger(__name__)

def create_model(name: str, **overrides) -> VisionTransformer:
    """The architecture of a registered model with random weights; never touches the network.

    ``overrides`` change config fields, e.g. ``drop_path_rate=0.1`` for fine-tuning.
    Build under ``with torch.device("meta"):`` to inspect shapes without allocating memory.
    """
    config = get_pretrained(name).config
    return VisionTransformer(**{**config.to_dict(), **overrides})


def _resolve_precision(precision: str | torch.dtype) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        if precision not in PRECISIONS.values():
            raise ValueError(f"Unsupported dtype {precision}: expected one of {list(PRECISIONS)}")
        return precision
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"Unknown precision {precision!r}: expected one of {list(PRECISIONS)}") from None


def _weights_file(
    name_or_path: str | os.PathLike, download_root: str | os.PathLike | None
) -> tuple[Path, ViTConfig | None]:
    """The local file to load and, for a registry name, its known architecture."""
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        from ._hub import download  # the only network code

        entry = REGISTRY[name_or_path]
        return Path(download(entry.url, entry.sha256, root=download_root)), entry.config
    if not str(name_or_path).strip():  # Path("") is the current folder
        raise ValueError(f"expected a model name ({', '.join(REGISTRY)}) or a checkpoint path, got an empty string")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    if path.exists():
        raise IsADirectoryError(f"{path} is a directory: expected a checkpoint file or one of {list(REGISTRY)}")
    raise ValueError(unknown_model_message(str(name_or_path)) + f" (no file exists at {path})")


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    download_root: str | os.PathLike | None = None,
    *,
    precision: str | torch.dtype = "fp32",
    compile: bool = False,
) -> tuple[torch.nn.Module, object]:
    """Load a UNICOM model and its eval transform.

    Args:
        name_or_path: a name from :func:`available_models` (downloaded once into the cache
            and verified against its SHA256) or the path of a checkpoint: a published
            state dict, a ``.safetensors`` file, or a file written by this library.
        device: where to put the model; default CUDA when available, else the CPU.
        download_root: the cache folder (default ``$UNICOM_CACHE_DIR`` or ``~/.cache/unicom``).
        precision: ``"fp32"`` (default, exact), ``"fp16"`` or ``"bf16"``: the dtype of the
            weights. Half precision is meant for GPU inference; feed inputs of the same dtype.
        compile: wrap the model in ``torch.compile`` (faster on GPUs after a warm-up).

    Returns:
        ``(model, transform)``: the model in eval mode, and the published eval transform
        (PIL image -> normalised tensor) for its input size.
    """
    dtype = _resolve_precision(precision)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    path, config = _weights_file(name_or_path, download_root)
    state_dict, recorded = read_checkpoint(path, verify=config is None)  # a registry file's SHA256 was checked
    try:
        config = config or recorded or config_from_state_dict(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = VisionTransformer.from_config(config)
    # Weights are loaded strictly on the CPU in float32 first, whatever dtype the file has.
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the architecture {config}: {mismatch(e)}") from None
    if dtype != torch.float32 and device.type == "cpu":
        logger.warning("precision %s on the CPU is slow and less accurate; fp32 is recommended there", precision)
    model = model.eval().to(device=device, dtype=dtype)
    if compile:
        model = torch.compile(model)
    return model, eval_transform(config.input_size)
