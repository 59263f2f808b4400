"""Building models (never touches the network) and loading published or local weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ._utils import PRECISIONS, QUANTIZED_PRECISIONS
from .checkpoint import CheckpointError, config_from_state_dict, mismatch, read_checkpoint
from .model import ViTConfig, VisionTransformer
from ._pretrained import REGISTRY, get_pretrained, unknown_model_message
from .transforms import eval_transform

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
        raise ValueError(f"Unknown precision {precision!r}: expected one of "
                         f"{[*PRECISIONS, *QUANTIZED_PRECISIONS]}") from None


def _weights_file(
    name_or_path: str | os.PathLike, download_root: str | os.PathLike | None
) -> tuple[Path, ViTConfig | None]:
    """The local file to load and, for a registry name, its known architecture."""
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        from ._hub import DownloadError, download  # the only network code

        entry = REGISTRY[name_or_path]
        try:
            return Path(download(entry.url, entry.sha256, root=download_root)), entry.config
        except DownloadError as error:
            error.args = (f"{error} Or skip the download: pass a checkpoint file you have instead of the name, "
                          "unicom.load('path/to/file.pt') or --model_name path/to/file.pt in the programs.",)
            raise
    if not str(name_or_path).strip():  # Path("") is the current folder
        raise ValueError(f"expected a model name ({', '.join(REGISTRY)}) or a checkpoint path, got an empty string")
    from .hf import HUB_PREFIX, is_model_folder, model_folder_files  # huggingface_hub is imported on use

    if (isinstance(name_or_path, str) and name_or_path.startswith(HUB_PREFIX)) or is_model_folder(name_or_path):
        return model_folder_files(name_or_path, download_root)  # config.json + model.safetensors
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
            and verified against its SHA256), the path of a checkpoint (a published state
            dict, a ``.safetensors`` file, or a file written by this library), a model folder
            written by :func:`unicom.save_pretrained`, or ``hf-hub:org/name[@revision]``
            (that folder on the Hugging Face Hub, through huggingface_hub's cache).
        device: where to put the model; default CUDA when available, else the CPU.
        download_root: the cache folder (default ``$UNICOM_CACHE_DIR`` or ``~/.cache/unicom``;
            for ``hf-hub:`` names huggingface_hub's, ``$HF_HUB_CACHE``).
        precision: ``"fp32"`` (default, exact), ``"fp16"`` or ``"bf16"``: the dtype of the
            weights. Half precision is meant for GPU inference; feed inputs of the same dtype.
            ``"int8"``: CPU inference with int8 weights (see :func:`unicom.quantize.quantize`;
            float32 in and out, faster than fp32 on CPUs, not the published numbers).
        compile: wrap the model in ``torch.compile`` (faster on GPUs after a warm-up).

    Returns:
        ``(model, transform)``: the model in eval mode, and the published eval transform
        (PIL image -> normalised tensor) for its input size.
    """
    if precision == "int8":  # quantised weights: a CPU-only module for inference (unicom/quantize.py)
        return _load_int8(name_or_path, device, download_root, compile)
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


def _load_int8(name_or_path, device, download_root, compile: bool) -> tuple[torch.nn.Module, object]:
    """``load(..., precision="int8")``: refused off the CPU before anything loads."""
    device = torch.device(device if device is not None else "cpu")  # int8's default: the only place it runs
    if device.type != "cpu":
        raise ValueError(f"precision='int8' runs on CPUs only, got device={str(device)!r}: use device='cpu', "
                         "or fp16/bf16 on GPUs")
    if compile:
        raise ValueError("compile=True does not apply to precision='int8' (ONNX Runtime or PyTorch's quantised "
                         "kernels run it)")
    from .quantize import quantize

    model, transform = load(name_or_path, "cpu", download_root)
    return quantize(model, cache_dir=download_root), transform
