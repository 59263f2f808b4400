"""Safe checkpoint loading and saving.

Files are read with ``weights_only=True`` (or as ``.safetensors``) so a tampered file
cannot run code; a file that needs pickled code is refused and never retried unsafely.
A published checkpoint (a bare state dict) gets its architecture from the tensor shapes;
a checkpoint written by :func:`save_model` records its config and loads exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._utils import atomic_write, unwrap_model
from .model import ViTConfig, VisionTransformer

__all__ = ["CheckpointError", "read_checkpoint", "config_from_state_dict", "save_model"]

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
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
        raise _damaged(path, f"its zip structure is broken ({_one_line(e)})") from e
    if bad is not None:
        raise _damaged(path, f"its record {bad} fails its CRC-32 check")


def _one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _torch_reason(error: BaseException) -> str:
    """What went wrong, in one line, without torch's multi-line advice about ``weights_only``."""
    text = str(error)
    m = re.search(r"WeightsUnpickler error:(.*?)(Please use `torch|Check the documentation|$)", text, re.DOTALL)
    if m is not None and m.group(1).strip():
        return _one_line(m.group(1))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return _one_line(" ".join(kept or lines) or type(error).__name__)


def _names_code(message: str) -> bool:
    """Whether the global a weights-only load refused names code that exists: ``posix.system`` is
    a pickle that wants to run it; ``cnllections.OrderedDict`` (a flipped bit) is damage."""
    m = re.search(r"GLOBAL (.*?) (was not an allowed global|whose module)", message, re.DOTALL)
    if m is None:
        return True
    module, _, attribute = m.group(1).rpartition(".")
    module = module or "builtins"  # GLOBAL print
    if not all(part.isidentifier() for part in (*module.split("."), attribute)):
        return False  # not a name Python code could have
    if module in sys.modules:
        return hasattr(sys.modules[module], attribute)
    try:  # the top-level package only: looked up, never imported
        return importlib.util.find_spec(module.split(".")[0] or attribute) is not None
    except (ImportError, ValueError):
        return False


def _damaged(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is damaged (truncated or corrupt?): {detail}. "
                           "Delete it and download or save it again.")


# What torch's weights-only unpickler says about code it refuses to run (a pickle reaches code
# through a GLOBAL first); anything else it raises means the pickle itself is broken.
_UNSAFE_MARKERS = ("Unsupported global", "unsupported GLOBAL")

# torch.save's legacy (non-zip) files start with this pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_INTEGRITY_KEY = "unicom_sha256"  # safetensors metadata written by save_model
_CONFIG_KEY = "unicom_config"


def tensors_digest(state_dict: dict[str, torch.Tensor], config_text: str = "") -> str:
    """The SHA-256 that :func:`save_model` records in a ``.safetensors`` file: the recorded config
    text, then every tensor's name, dtype, shape and bytes, in sorted name order."""
    hasher = hashlib.sha256(config_text.encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        hasher.update(f"\0{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except (SafetensorError, Exception) as e:  # noqa: BLE001 - a damaged header fails in several ways
        raise _damaged(path, f"not a readable .safetensors file ({_one_line(e)})") from e
    recorded = metadata.get(_INTEGRITY_KEY)
    if recorded is not None and tensors_digest(tensors, metadata.get(_CONFIG_KEY, "")) != recorded:
        raise _damaged(path, f"its tensors or config do not match the SHA-256 recorded when it was saved "
                             f"({_INTEGRITY_KEY})")
    return tensors, metadata


def _read_file(path: Path, verify: bool = True) -> tuple[Any, dict[str, str]]:
    """The raw object in ``path`` and any safetensors metadata. ``verify`` checks the CRC-32 of
    every record of a zip checkpoint first (a few seconds per GB) and warns that a legacy
    (non-zip) file cannot be checked."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):  # a zip archive whose directory (at the end) is missing
            raise _damaged(path, "a zip archive cut short (its directory is missing)")
        if verify:
            _check_records(path)
    elif zipfile.is_zipfile(path):  # a zip directory at the end, but other bytes at the start
        raise _damaged(path, f"a zip archive with other bytes in front of it (it starts with {head!r}, "
                             "not the zip signature)")
    elif head.startswith(b"\x80"):  # a pickle: torch's legacy format starts with its magic number
        with open(path, "rb") as f:
            start = f.read(len(_LEGACY_MAGIC))
        flipped = sum(bin(a ^ b).count("1") for a, b in zip(start, _LEGACY_MAGIC))
        if flipped > 2:  # a few flipped bits are damage; more is another kind of pickle
            raise CheckpointError(f"{path} is not a PyTorch checkpoint: a Python pickle that torch.save did not write "
                                  "(refused unread: unpickling it could run code)")
        if len(start) < len(_LEGACY_MAGIC):
            raise _damaged(path, "a legacy torch file cut short")
        if verify:
            logger.warning("%s is in torch's legacy (non-zip) format, which carries no checksum: damage to "
                           "its weights cannot be detected (check it against a known SHA256, or re-save it "
                           "with unicom.checkpoint.save_model)", path)
    elif head.startswith(b"PK"):
        raise _damaged(path, f"it starts with {head!r}, a damaged zip signature")
    else:
        what = "an empty file" if not head else f"it starts with {head!r}"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; {what}): a web "
                              "page or a Git LFS pointer saved in its place?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails inside torch in many ways
        message = _torch_reason(e)
        if (isinstance(e, pickle.UnpicklingError) and any(m in str(e) for m in _UNSAFE_MARKERS)
                and _names_code(str(e))):
            raise CheckpointError(
                f"Refusing to load {path}: unsafe, it contains pickled Python objects beyond tensors, which could "
                "run arbitrary code. Only plain tensor checkpoints (a state dict) or .safetensors files are "
                "accepted; if you trust the file, re-save its state dict with torch.save(model.state_dict(), ...) "
                f"({message[:200]})"
            ) from None
        raise _damaged(path, f"{type(e).__name__}: {message}") from e


def _recorded_config(path: Path, recorded: Any) -> ViTConfig:
    """A config recorded in a checkpoint (a dict, or its JSON text), or a CheckpointError."""
    try:
        values = json.loads(recorded) if isinstance(recorded, str) else recorded
        return ViTConfig(**values)
    except (TypeError, ValueError) as e:  # unknown keys, impossible values, bad JSON
        raise CheckpointError(f"{path} records a config that is not a VisionTransformer's ({_one_line(e)}): "
                              f"{_one_line(recorded)[:200]}") from None


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], ViTConfig | None]:
    """The model state dict in ``path`` (prefixes stripped) and its recorded config, if any.
    ``verify`` checks the CRC-32 of a zip checkpoint's records (skip it for files whose SHA256
    was just checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    obj, metadata = _read_file(path, verify)
    config = None
    if _CONFIG_KEY in metadata:
        config = _recorded_config(path, metadata[_CONFIG_KEY])
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


def mismatch(error: RuntimeError) -> str:
    """``load_state_dict``'s multi-line complaint in one line (first problems, then a count)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error).strip()]
    return _one_line("; ".join(lines))


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
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    except KeyError as e:
        raise CheckpointError(f"not a UNICOM VisionTransformer state dict: missing {e.args[0]!r}") from None
    except (ValueError, IndexError) as e:  # tensors of other ranks, block names without a number
        raise CheckpointError(f"not a UNICOM VisionTransformer state dict: unexpected shapes or names "
                              f"({_one_line(e)})") from None
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise CheckpointError(f"pos_embed has {num_patches} tokens, not a square grid")
    if min(dim, in_channels, patch_size, hidden, embedding_size, grid) < 1:
        raise CheckpointError("not a UNICOM VisionTransformer state dict: a tensor of size 0")
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

    A ``.safetensors`` suffix writes safetensors (config and a SHA-256 of config and tensors
    in its metadata, checked on load); anything else writes a ``torch.save`` zip file holding
    ``{"config": ..., "state_dict": ...}`` (its records carry CRC-32s, checked on load).
    """
    model = unwrap_model(model)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        text = json.dumps(config)
        data = save(state_dict, metadata={_CONFIG_KEY: text, _INTEGRITY_KEY: tensors_digest(state_dict, text)})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_save({"config": config, "state_dict": state_dict}, path)
