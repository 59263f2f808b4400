"""Step 1 of cluster discrimination pretraining: one L2-normalised feature per image.

Feature sources are data: :data:`SOURCES` maps a name to a builder.

- ``clip``: an open_clip model (any model name and pretrained tag, or a local file); the
  image feature, the caption's text feature, and their fusion (``mean``: the mean of the
  two L2-normalised features, renormalised; ``image`` or ``text`` alone). A sample without
  a caption falls back to its image feature, and is counted.
- ``unicom``: a UNICOM model (registered name or checkpoint path), images only.
- ``pixels``: the image resized small, flattened, scaled to [-1, 1] and L2-normalised; for
  tests and demos.

Output folder layout (one set of files per input shard, then a manifest)::

    features_<shard>.npy   (n, d) float16, L2-normalised rows, in the shard's sample order
    keys_<shard>.txt       the n sample keys, one a line
    meta_<shard>.json      counts (samples, undecodable images, captionless fallbacks), config
    manifest.json          the configuration and the shards in input order (written last)

Every file is written to a temporary name and renamed, and the features file is renamed
last: it marks the shard done. A crash loses at most the shards in flight (one per data
loading worker), and a rerun with the same configuration skips finished shards. With
torchrun each process takes the shards ``i`` with ``i % world_size == rank``; the output
folder must be shared by all processes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T
from tqdm import tqdm

from .. import _distributed as dist
from .._utils import atomic_write, autocast_for
from ..transforms import to_rgb
from .webdataset import Shard, iter_shard_samples, list_shards, shard_identity

__all__ = [
    "FUSIONS",
    "SOURCES",
    "FeatureSource",
    "available_sources",
    "build_source",
    "extract_features",
    "fuse",
    "load_features",
    "read_manifest",
]

logger = logging.getLogger(__name__)

FUSIONS = ("mean", "image", "text")
MANIFEST = "manifest.json"
_MAX_LOGGED_BAD = 100  # individual warnings per process; later ones are only counted


# ----------------------------------------------------------------------------- sources


def fuse(image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor, fusion: str) -> torch.Tensor:
    """Combine L2-normalised image features (B, d) with text features (T, d) of the rows with text.

    ``has_text`` (B,) bool selects the T rows that have a caption (in order). ``mean``: the
    renormalised mean of the two; ``text``: the text feature; ``image``: the image feature.
    Rows without a caption keep their image feature whatever the fusion.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: expected one of {FUSIONS}")
    if int(has_text.sum()) != text.shape[0]:
        raise ValueError(f"{text.shape[0]} text features for {int(has_text.sum())} rows with a caption")
    out = image.clone()
    if fusion == "mean":
        out[has_text] = F.normalize(image[has_text] + text, dim=-1)
    elif fusion == "text":
        out[has_text] = text
    return out


class FeatureSource:
    """Turns decoded images (and tokenised captions) into L2-normalised features.

    Subclasses set ``name``, ``dim``, ``device``, ``image_transform`` (PIL RGB image ->
    (3, H, W) tensor; runs in data loading workers) and, when they read captions,
    ``tokenizer`` (list of captions -> (T, L) token tensor; also in workers).
    """

    name: str = ""
    dim: int = 0
    device: torch.device = torch.device("cpu")
    image_transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    @property
    def uses_text(self) -> bool:
        return self.tokenizer is not None

    def describe(self) -> dict[str, Any]:
        """What makes these features what they are (recorded, and checked when resuming)."""
        return {"source": self.name}

    def encode(
        self, images: torch.Tensor, tokens: torch.Tensor | None, has_text: torch.Tensor, fusion: str,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """(B, 3, H, W) images on ``device`` -> (B, dim) float32 L2-normalised features."""
        raise NotImplementedError


class PixelSource(FeatureSource):
    """Raw pixels: resized to ``size`` x ``size``, flattened, scaled to [-1, 1], L2-normalised."""

    name = "pixels"

    def __init__(self, size: int = 16, device: str | torch.device | None = None) -> None:
        if size < 1:
            raise ValueError(f"pixel size must be >= 1, got {size}")
        self.size = size
        self.dim = 3 * size * size
        self.device = torch.device(device or "cpu")
        self.image_transform = T.Compose([T.Resize((size, size), antialias=True), T.ToTensor()])

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "size": self.size}

    @torch.no_grad()
    def encode(self, images, tokens, has_text, fusion, precision="fp32"):
        return F.normalize(images.flatten(1).float() * 2 - 1, dim=-1)  # (B, 3*size*size)


class UnicomSource(FeatureSource):
    """A UNICOM model's embedding of the image, L2-normalised."""

    name = "unicom"

    def __init__(self, model_name: str = "ViT-B/32", device: str | torch.device | None = None) -> None:
        from .._factory import load

        self.model_name = str(model_name)
        self.model, self.image_transform = load(model_name, device=device)
        self.device = next(self.model.parameters()).device
        self.dim = self.model.config.embedding_size

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "model": self.model_name}

    @torch.no_grad()
    def encode(self, images, tokens, has_text, fusion, precision="fp32"):
        with autocast_for(self.device, precision):
            out = self.model(images)
        return F.normalize(out.float(), dim=-1)


class ClipSource(FeatureSource):
    """An open_clip model: image and caption features and their fusion.

    Build it from a name with ``ClipSource.create("ViT-B-32", "laion400m_e32")``, or wrap an
    open_clip ``model``, its eval ``preprocess`` and ``tokenizer`` already built.
    """

    name = "clip"

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 description: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.image_transform = preprocess
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.description = {"source": self.name, **(description or {})}
        # The embedding width is not in every open_clip config: read it off one forward pass.
        probe = preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(self.device)
        with torch.no_grad():
            self.dim = int(model.encode_image(probe).shape[-1])

    @classmethod
    def create(cls, model_name: str = "ViT-B-32", pretrained: str | None = "laion400m_e32",
               device: str | torch.device | None = None, **open_clip_kwargs: Any) -> ClipSource:
        """Build with open_clip; ``pretrained=None`` gives random weights (for tests), and any
        other value is an open_clip tag (downloaded by open_clip) or a local weights file."""
        import open_clip

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **open_clip_kwargs)
        if pretrained is None:
            logger.warning("open_clip model %s has random weights (pretrained=None)", model_name)
        # a shortened text context (force_context_length) must shorten the tokenizer's output too
        tokenizer = open_clip.get_tokenizer(model_name, context_length=open_clip_kwargs.get("force_context_length"))
        description = {"model": model_name, "pretrained": pretrained, **open_clip_kwargs}
        return cls(model, preprocess, tokenizer, description)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    @torch.no_grad()
    def encode(self, images, tokens, has_text, fusion, precision="fp32"):
        with autocast_for(self.device, precision):
            image = self.model.encode_image(images)
            text = self.model.encode_text(tokens) if tokens is not None and tokens.shape[0] else None
        image = F.normalize(image.float(), dim=-1)  # (B, d)
        if text is None:
            return image
        return fuse(image, F.normalize(text.float(), dim=-1), has_text, fusion)


@dataclass(frozen=True)
class SourceEntry:
    builder: Callable[..., FeatureSource]
    help: str


SOURCES: dict[str, SourceEntry] = {
    "clip": SourceEntry(ClipSource.create, "open_clip image + caption features (model_name, pretrained)"),
    "unicom": SourceEntry(UnicomSource, "a UNICOM model's image embedding (model_name)"),
    "pixels": SourceEntry(PixelSource, "raw pixels resized small (size); for tests and demos"),
}


def available_sources() -> list[str]:
    return list(SOURCES)


def build_source(name: str, device: str | torch.device | None = None, **options: Any) -> FeatureSource:
    """The feature source registered as ``name``, built with ``options`` on ``device``."""
    try:
        entry = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown feature source {name!r}: expected one of {available_sources()}") from None
    return entry.builder(device=device, **options)


# ----------------------------------------------------------------------------- data


@dataclass
class _Batch:
    shard: int  # index into the list of shards given to the dataset
    keys: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None  # (B, 3, H, W)
    tokens: torch.Tensor | None = None  # (T, L): the captions of the rows with has_text
    has_text: torch.Tensor | None = None  # (B,) bool
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of skipped samples
    last: bool = False  # the shard's final batch: the shard can be written once it is in
    error: str | None = None  # why reading the shard stopped early (a damaged tar), on the last batch

    def pin_memory(self) -> _Batch:
        """Called by the DataLoader's pinning thread (CUDA only)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        if self.tokens is not None:
            self.tokens = self.tokens.pin_memory()
        return self


def _decode(data: bytes, transform: Callable) -> torch.Tensor:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode fully now so a truncated file fails here
    return transform(to_rgb(image))


class _ShardBatches(IterableDataset):
    """Batches of decoded samples, each from one shard, shards split over loader workers.

    A worker takes shards ``j, j + W, ...`` of the list (W workers) and reads each front to
    back, so each shard's batches arrive in order and end with one ``last`` batch (possibly
    empty). Undecodable images are reported in ``bad``, never replaced.
    """

    def __init__(self, shards: list[Shard], transform: Callable, tokenizer: Callable | None, batch_size: int):
        self.shards, self.transform, self.tokenizer, self.batch_size = shards, transform, tokenizer, batch_size

    def _make(self, index: int, keys, images, captions, bad, last, error=None) -> _Batch:
        has_text = torch.tensor([c is not None for c in captions], dtype=torch.bool)
        texts = [c for c in captions if c is not None]
        tokens = self.tokenizer(texts) if self.tokenizer is not None and texts else None
        return _Batch(index, keys, torch.stack(images) if images else None, tokens, has_text, bad, last, error)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.shards), workers):
            keys, images, captions, bad = [], [], [], []
            error = None
            try:
                for sample in iter_shard_samples(self.shards[index]):
                    if sample.problem is not None:
                        bad.append((sample.key, sample.problem))
                        continue
                    if sample.image is None:
                        bad.append((sample.key, "no image in the sample"))
                        continue
                    if "\n" in sample.key or "\r" in sample.key:
                        bad.append((sample.key, "key contains a line break"))
                        continue
                    try:
                        images.append(_decode(sample.image, self.transform))
                    except Exception as e:  # noqa: BLE001 - any decoding failure skips the sample, whatever raised it
                        bad.append((sample.key, f"{type(e).__name__}: {e}"))
                        continue
                    keys.append(sample.key)
                    captions.append(sample.caption)
                    if len(keys) == self.batch_size:
                        yield self._make(index, keys, images, captions, bad, False)
                        keys, images, captions, bad = [], [], [], []
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise  # a missing or unreadable file is not damaged data: fail, a rerun retries it
            except (OSError, EOFError, tarfile.TarError) as e:
                # A damaged tar (cut short by a failed download, say) is damaged data like an
                # undecodable image: the samples read before the damage are kept, the error is
                # recorded in the shard's meta and the manifest, and the run goes on.
                error = f"{type(e).__name__}: {e}"
            yield self._make(index, keys, images, captions, bad, True, error)


# ----------------------------------------------------------------------------- output


def _paths(output_dir: Path, name: str) -> dict[str, Path]:
    return {
        "features": output_dir / f"features_{name}.npy",
        "keys": output_dir / f"keys_{name}.txt",
        "meta": output_dir / f"meta_{name}.json",
    }


def _write_shard(output_dir: Path, name: str, features: np.ndarray, keys: list[str], meta: dict) -> None:
    paths = _paths(output_dir, name)
    atomic_write(paths["keys"], lambda f: f.write("".join(k + "\n" for k in keys)), "w")
    atomic_write(paths["meta"], lambda f: f.write(json.dumps(meta, indent=1) + "\n"), "w")
    atomic_write(paths["features"], lambda f: np.save(f, features))  # last: marks the shard done


def _read_keys(path: Path) -> list[str]:
    # split on "\n" only: str.splitlines would also split keys holding other line separators
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _read_meta(output_dir: Path, name: str) -> dict | None:
    """The shard's meta if the shard is finished, else None."""
    paths = _paths(output_dir, name)
    if not all(p.exists() for p in paths.values()):
        return None
    return json.loads(paths["meta"].read_text())


def _config_mismatch(found: dict, wanted: dict) -> str:
    diffs = [f"{k}: {found.get(k)!r} != {wanted.get(k)!r}"
             for k in sorted({*found, *wanted}) if found.get(k) != wanted.get(k)]
    return "; ".join(diffs)


def extract_features(
    source: str | FeatureSource,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    fusion: str | None = None,
    *,
    precision: str = "fp32",
    num_workers: int = 0,
    folder_shard_size: int = 10_000,
    source_options: dict[str, Any] | None = None,
) -> dict:
    """Write one L2-normalised float16 feature per sample of ``inputs`` to ``output_dir``.

    Args:
        source: a name from :data:`SOURCES` (built with ``source_options`` on ``device``), or
            a :class:`FeatureSource` already built (it brings its own device).
        inputs: tar shards (paths, ``shard-{000..009}.tar`` patterns, globs) or one folder of
            images with optional same-name ``.txt`` captions.
        output_dir: where the per-shard files and ``manifest.json`` go; finished shards found
            there (with the same configuration) are kept, not recomputed.
        fusion: ``mean``, ``image`` or ``text``; default ``mean`` for sources that read
            captions, ``image`` otherwise.
        precision: autocast for the model's forward pass (``fp32``, ``fp16``, ``bf16``).
        num_workers: data loading processes per process (decoding runs there).
        folder_shard_size: images per virtual shard for folder input.

    Returns:
        The manifest (also written to ``output_dir/manifest.json`` by rank 0): configuration,
        totals and the shards in input order. Runs on every process of a torchrun job, each
        taking the shards ``i % world_size == rank``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, str):
        source = build_source(source, device=device, **(source_options or {}))
    if fusion is None:
        fusion = "mean" if source.uses_text else "image"
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: expected one of {FUSIONS}")
    if fusion != "image" and not source.uses_text:
        raise ValueError(f"source {source.name!r} reads no captions: fusion must be 'image', not {fusion!r}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shards = list_shards(inputs, folder_shard_size)
    config = {**source.describe(), "fusion": fusion, "dim": source.dim, "dtype": "float16"}
    if shards[0].files is not None:
        config["folder_shard_size"] = folder_shard_size
    if (output_dir / MANIFEST).exists():
        found = json.loads((output_dir / MANIFEST).read_text())["config"]
        if found != config:
            raise ValueError(f"{output_dir} holds features of another configuration "
                             f"({_config_mismatch(found, config)}); use a new output folder")

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = []
    for shard in mine:
        meta = _read_meta(output_dir, shard.name)
        if meta is None:
            todo.append(shard)
        elif meta["config"] != config:
            raise ValueError(f"shard {shard.name} in {output_dir} was written with another configuration "
                             f"({_config_mismatch(meta['config'], config)}); use a new output folder")
        elif "input_id" in meta and meta["input_id"] != (identity := shard_identity(shard)):
            raise ValueError(f"shard {shard.name} in {output_dir} holds the features of another input "
                             f"({meta['input']}: {meta['input_id']}; this run's {shard.source}: {identity}); "
                             f"use a new output folder, or delete {_paths(output_dir, shard.name)['features'].name} "
                             "to extract it again")
    logger.info("%d shards, %d for this process, %d already done", len(shards), len(mine), len(mine) - len(todo))
    _run(source, todo, output_dir, config, fusion, batch_size, precision, num_workers, rank)

    dist.barrier()
    manifest = _manifest(output_dir, shards, config)
    if dist.is_main_process():
        atomic_write(output_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1) + "\n"), "w")
        logger.info("%d samples in %d shards (%d undecodable skipped, %d without caption) -> %s",
                    manifest["num_samples"], len(shards), manifest["num_bad"], manifest["num_without_caption"],
                    output_dir)
    dist.barrier()
    return manifest


@dataclass
class _Pending:
    features: list[torch.Tensor] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    without_caption: int = 0
    start: float = field(default_factory=time.perf_counter)


def _run(source: FeatureSource, todo: list[Shard], output_dir: Path, config: dict, fusion: str,
         batch_size: int, precision: str, num_workers: int, rank: int) -> None:
    if not todo:
        return
    tokenizer = source.tokenizer if fusion != "image" else None
    dataset = _ShardBatches(todo, source.image_transform, tokenizer, batch_size)
    workers = min(num_workers, len(todo))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        pin_memory=source.device.type == "cuda", persistent_workers=False)
    pending: dict[int, _Pending] = {}
    logged_bad = 0
    progress = tqdm(total=len(todo), desc="shards", unit="shard", disable=not dist.is_main_process())
    for batch in loader:
        acc = pending.setdefault(batch.shard, _Pending())
        if batch.images is not None:
            images = batch.images.to(source.device, non_blocking=True)
            tokens = batch.tokens.to(source.device, non_blocking=True) if batch.tokens is not None else None
            has_text = batch.has_text.to(source.device)
            features = source.encode(images, tokens, has_text, fusion, precision)  # (B, d) float32
            acc.features.append(features.to(torch.float16).cpu())
            acc.keys.extend(batch.keys)
            if fusion != "image":
                acc.without_caption += int((~batch.has_text).sum())
        for key, reason in batch.bad:
            if logged_bad < _MAX_LOGGED_BAD:
                logger.warning("skipped %s (shard %s): %s", key, todo[batch.shard].name, reason)
            logged_bad += 1
        acc.bad.extend(batch.bad)
        if batch.last:
            shard = todo[batch.shard]
            done = pending.pop(batch.shard)
            features = torch.cat(done.features).numpy() if done.features else np.zeros((0, source.dim), np.float16)
            seconds = time.perf_counter() - done.start
            meta = {
                "shard": shard.name, "input": shard.source, "input_id": shard_identity(shard),
                "num_samples": len(done.keys),
                "num_bad": len(done.bad), "bad": done.bad, "num_without_caption": done.without_caption,
                "read_error": batch.error, "rank": rank, "precision": precision, "seconds": seconds, "config": config,
            }
            if batch.error:
                logger.warning("shard %s is damaged: kept the %d samples before the damage (%s)",
                               shard.name, len(done.keys), batch.error)
            _write_shard(output_dir, shard.name, features, done.keys, meta)
            progress.update(1)
            logger.info("shard %s: %d samples (%d skipped) at %.1f samples/s", shard.name, len(done.keys),
                        len(done.bad), len(done.keys) / max(seconds, 1e-9))
    progress.close()
    if logged_bad > _MAX_LOGGED_BAD:
        logger.warning("%d undecodable samples skipped in all (first %d logged)", logged_bad, _MAX_LOGGED_BAD)
    if pending:
        raise RuntimeError(f"internal error: shards left unfinished: {[todo[i].name for i in pending]}")


def _manifest(output_dir: Path, shards: list[Shard], config: dict) -> dict:
    entries = []
    for shard in shards:
        meta = _read_meta(output_dir, shard.name)
        if meta is None:
            raise RuntimeError(f"shard {shard.name} was not written to {output_dir}; rerun to finish it")
        entries.append({k: meta.get(k) for k in ("shard", "input", "input_id", "num_samples", "num_bad",
                                                 "num_without_caption", "read_error")})
    return {
        "config": config,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_bad": sum(e["num_bad"] for e in entries),
        "num_without_caption": sum(e["num_without_caption"] for e in entries),
        "damaged_shards": [e["shard"] for e in entries if e["read_error"]],
        "shards": entries,
    }


# ----------------------------------------------------------------------------- reading


def read_manifest(output_dir: str | os.PathLike) -> dict:
    """The manifest of a finished feature run (raises if the run did not finish)."""
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {output_dir}: the feature run has not finished (rerun it to resume)")
    return json.loads(path.read_text())


def load_features(
    output_dir: str | os.PathLike,
    rows: range | None = None,
    with_keys: bool = True,
) -> tuple[torch.Tensor, list[str] | None]:
    """The features (N, d) float16 and their keys, in shard (input) order.

    ``rows`` selects a contiguous block of the N rows (e.g. this process's
    :func:`unicom._distributed.shard_range`), read through memory maps so only that block is
    loaded. ``with_keys=False`` skips reading the keys (returns None for them).
    """
    output_dir = Path(output_dir)
    manifest = read_manifest(output_dir)
    total = manifest["num_samples"]
    rows = range(total) if rows is None else rows
    if rows.step != 1 or rows.start < 0 or rows.stop > total or rows.start > rows.stop:
        raise ValueError(f"rows {rows} is not a contiguous block of range({total})")
    parts, keys = [], [] if with_keys else None
    offset = 0
    for entry in manifest["shards"]:
        n = entry["num_samples"]
        lo, hi = max(rows.start - offset, 0), min(rows.stop - offset, n)
        offset += n
        if lo >= hi:
            continue
        paths = _paths(output_dir, entry["shard"])
        array = np.load(paths["features"], mmap_mode="r")
        if array.shape[0] != n:
            raise RuntimeError(f"{paths['features']} holds {array.shape[0]} rows, the manifest says {n}")
        parts.append(np.ascontiguousarray(array[lo:hi]))
        if keys is not None:
            keys.extend(_read_keys(paths["keys"])[lo:hi])
    dim = manifest["config"]["dim"]
    features = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dim, dtype=torch.float16)
    return features, keys
