"""Int8 inference on CPUs: the weights of the matrix products quantised to int8, the activations
quantised per batch as they come (dynamic quantisation), float32 images in, float32 embeddings out.

Two backends; ``load(..., precision="int8")`` takes the first one installed:

* ``onnxruntime`` (``pip install unicom[cpu]``): the model is exported to ONNX once, its MatMuls
  quantised by ONNX Runtime's ``quantize_dynamic``, and the file cached under the unicom cache
  folder (``int8/<key>.onnx``, the key a hash of the weights, the architecture and the versions
  that made it), so later loads only open it.
* ``torch``: PyTorch's ``quantize_dynamic`` of the Linear layers; no extra package, slower.

``benchmarks/bench_cpu.py`` measures both against fp32 (speed, cosine to the fp32 embedding,
retrieval metrics); the README gives the figures.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ._utils import atomic_write, unwrap_model
from .model import VisionTransformer, ViTConfig, check_images

__all__ = ["BACKENDS", "OnnxModel", "export_onnx", "onnxruntime_available", "quantize"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "torch")
# Part of the cache key: change it when the export or the quantisation changes, so that files made
# the old way are never opened again.
_FORMAT = 2
_ORT_PACKAGES = ("onnxruntime", "onnx")  # onnx: ONNX Runtime's quantisation tools read and write with it


def onnxruntime_available() -> bool:
    """Whether the packages of the ``onnxruntime`` backend are installed here (found, not imported:
    importing them takes a while and a cached file needs only onnxruntime)."""
    return all(importlib.util.find_spec(name) is not None for name in _ORT_PACKAGES)


def quantize(
    model: VisionTransformer, backend: str = "auto", cache_dir: str | Path | None = None
) -> nn.Module:
    """An int8 CPU module computing ``model``'s embedding (images (B, C, H, W) -> (B, embedding_size)).

    Args:
        model: a :class:`VisionTransformer` (left unchanged).
        backend: ``"onnxruntime"``, ``"torch"`` or ``"auto"`` (onnxruntime when its packages are
            installed, else torch with a warning).
        cache_dir: the unicom cache folder (default ``$UNICOM_CACHE_DIR`` or ``~/.cache/unicom``);
            the onnxruntime backend keeps its quantised files in ``int8/`` there.

    Returns:
        A module in eval mode with the model's ``config``; for inference only (no gradients).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown int8 backend {backend!r}: expected one of {list(BACKENDS)}")
    model = unwrap_model(model)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"quantize() takes a unicom VisionTransformer, got {type(model).__name__}")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("quantize() takes a float32 model on the CPU (model.float().cpu())")
    if backend == "auto":
        backend = "onnxruntime" if onnxruntime_available() else "torch"
        if backend == "torch":
            logger.warning("int8 without ONNX Runtime: PyTorch's dynamic quantisation, slower and less close to fp32 "
                           "(pip install unicom[cpu] for the faster backend)")
    if backend == "torch":  # a quantised copy
        with warnings.catch_warnings():  # torch says torch.ao.quantization is deprecated (still there in 2.14)
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
            warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated",
                                    category=DeprecationWarning)
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8).eval()
    if not onnxruntime_available():
        raise ImportError(f"the onnxruntime int8 backend needs {', '.join(_ORT_PACKAGES)}: pip install unicom[cpu]")
    path = _cached_onnx(model, cache_dir)
    try:
        return OnnxModel(path, model.config)
    except Exception as error:  # onnxruntime's own error types; a file it cannot read is remade once
        logger.warning("the cached int8 model %s cannot be opened (%s); making it again", path,
                       str(error).splitlines()[0][:200])
        path.unlink(missing_ok=True)
        return OnnxModel(_cached_onnx(model, cache_dir), model.config)


class OnnxModel(nn.Module):
    """An ONNX file of a :class:`VisionTransformer` (quantised by :func:`quantize`, or as
    :func:`export_onnx` writes it) run by ONNX Runtime on the CPU.

    ``forward`` takes float images on the CPU (any float dtype, cast to float32) and returns
    float32 embeddings; no gradients flow through it.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, config: ViTConfig, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        self.path, self.config = Path(path), config
        options = onnxruntime.SessionOptions()
        if threads:  # default: ONNX Runtime's, one per physical core
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.config)
        if x.device.type != "cpu" or not x.is_floating_point():
            raise ValueError(f"int8 models take float images on the CPU, got {x.dtype} on {x.device}")
        if x.shape[0] == 0:
            return torch.empty(0, self.config.embedding_size)
        images = x.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self._session.run(None, {self._input: images})[0])

    def extra_repr(self) -> str:
        return f"backend={self.backend}, path={self.path}"


def _cache_key(model: VisionTransformer) -> str:
    """A hash of what the quantised file depends on: the weights (every tensor of the state dict,
    its name, dtype and shape), the architecture, and the versions that export and quantise."""
    import onnxruntime

    h = hashlib.sha256()
    versions = {"format": _FORMAT, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    h.update(json.dumps({"config": model.config.to_dict(), **versions}, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _cached_onnx(model: VisionTransformer, cache_dir: str | Path | None) -> Path:
    from ._hub import cache_dir as default_cache_dir  # a folder name only: no network here

    root = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    path = root / "int8" / f"{_cache_key(model)[:32]}.onnx"
    if path.is_file():
        return path
    logger.info("quantising the model to int8 once (about a minute for ViT-B); cached in %s", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export.") as tmp:
        quantized = _export_quantized(model, Path(tmp))
        with open(quantized, "rb") as source:  # the rename makes it whole or absent for other processes
            atomic_write(path, lambda f: shutil.copyfileobj(source, f, 1 << 24))
    return path


def _export_quantized(model: VisionTransformer, folder: Path) -> Path:
    """Export ``model`` to ONNX in ``folder``, quantise its MatMuls to int8 (signed weights, per
    tensor) and return the quantised file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
    export_onnx(model, fp32)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # its quantiser logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)
    return int8


def export_onnx(model: VisionTransformer, path: str | Path) -> None:
    """Write ``model`` (float32, CPU) as ONNX at ``path``, in eval mode, for any batch size."""
    config = model.config
    example = torch.zeros(2, config.in_channels, config.input_size, config.input_size)
    training = model.training
    try:
        # The TorchScript exporter: seconds where torch.export's takes a minute or more (and needs
        # onnxscript), the same graph for ONNX Runtime (same MatMuls, same speed). Its deprecation
        # notice and the tracer's note on the input-shape checks are not for the user.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own internals
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model.eval(), (example,), str(path), input_names=["images"],
                              output_names=["embeddings"], dynamic_axes={"images": {0: "batch"}},
                              opset_version=17, dynamo=False)
    finally:
        model.train(training)
