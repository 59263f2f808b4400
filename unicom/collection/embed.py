"""``unicom embed``: embed sources into a collection, incrementally and resumably, each process
of a torchrun its share.

The files to embed (new, or changed: path, size or mtime differ and the content hash too) are
cut into parts of ``part_size`` in listing order. Every process embeds its share of a part with
the project's input pipelines (:func:`unicom.evaluate.embed_dataset`), hashes and measures its
share of the files, the shares are gathered with tensor collectives, and rank 0 writes the part.
A killed run leaves whole parts only, so running it again embeds what is left, cut at the same
boundaries: the result is what one uninterrupted run writes.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import _distributed as dist
from ..data.image import BadImageError
from ..evaluate import embed_dataset
from .sources import Item, SourceDataset, file_info, list_sources
from .store import FORMAT_VERSION, Store, live_mask, new_table

__all__ = ["EmbedSummary", "embed_collection", "model_identity"]

logger = logging.getLogger(__name__)

PART_SIZE = 10_000


@dataclass
class EmbedSummary:
    """What one ``embed`` run did."""

    embedded: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (undecodable files, non-images)
    errors: list[str] = field(default_factory=list)  # "path: reason" of the first undecodable files

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        out = [f"embedded {self.embedded}, unchanged {self.unchanged}, skipped {skipped}, deleted {self.deleted}"]
        out += [f"  skipped {n} x {reason}" for reason, n in self.skipped.most_common()]
        out += [f"  {e}" for e in self.errors[:5]]
        return out


def model_identity(name_or_path: str) -> tuple[str, str]:
    """(model as the manifest records it, SHA256 of its checkpoint file): a registry name and its
    published hash, or a local file's absolute path and the hash of its bytes."""
    from .._hub import _hash_file
    from .._pretrained import REGISTRY

    if name_or_path in REGISTRY:
        return name_or_path, REGISTRY[name_or_path].sha256
    path = os.path.abspath(os.path.expanduser(name_or_path))
    if not os.path.isfile(path):
        from .._pretrained import unknown_model_message

        raise ValueError(unknown_model_message(name_or_path) + f" (no file exists at {path})")
    return path, _hash_file(path).hexdigest()


def _check_model(store: Store, manifest: dict, model: str, sha256: str) -> None:
    if manifest["checkpoint_sha256"] != sha256:
        raise ValueError(f"{store.root} was embedded with {manifest['model']} (checkpoint SHA256 "
                         f"{manifest['checkpoint_sha256'][:12]}...), not {model} ({sha256[:12]}...): embeddings of "
                         "two models cannot be searched together; use another --output folder")


@dataclass
class _Plan:
    pending: list[Item]
    unchanged: int
    rewrites: dict[int, dict[int, dict]]  # part -> row -> column updates (deleted=True, or new size/mtime)
    deleted: int


def _plan(store: Store, manifest: dict, items: list[Item]) -> _Plan:
    """Which items to embed, and which stored rows to mark deleted or refresh."""
    table = store.all_metadata([p["part"] for p in manifest["parts"]],
                               columns=["image_path", "size", "mtime", "sha256", "deleted"])
    current = {}
    deleted_col = table.column("deleted").to_pylist()
    for path, size, mtime, sha, deleted, part, row in zip(*(table.column(c).to_pylist() for c in (
            "image_path", "size", "mtime", "sha256")), deleted_col, table.column("part").to_pylist(),
            table.column("row").to_pylist()):
        if not deleted:
            current[path] = (size, mtime, sha, part, row)
    rewrites: dict[int, dict[int, dict]] = {}
    pending, unchanged, deleted = [], 0, 0
    for item in items:
        stored = current.pop(item.path, None)
        if stored is None:
            pending.append(item)
            continue
        size, mtime, sha, part, row = stored
        if (size, mtime) == (item.size, item.mtime):
            unchanged += 1
        elif file_info(item)[0].hex() == sha:  # touched or copied back: same bytes, same row and id
            rewrites.setdefault(part, {})[row] = {"size": item.size, "mtime": item.mtime}
            unchanged += 1
        else:
            rewrites.setdefault(part, {})[row] = {"deleted": True}
            pending.append(item)
    for size, mtime, sha, part, row in current.values():  # stored, but no longer in the sources
        rewrites.setdefault(part, {})[row] = {"deleted": True}
        deleted += 1
    return _Plan(pending, unchanged, rewrites, deleted)


def _apply_rewrites(store: Store, rewrites: dict[int, dict[int, dict]]) -> None:
    for part, rows in sorted(rewrites.items()):
        columns = store.metadata(part).to_pydict()
        for row, updates in rows.items():
            for name, value in updates.items():
                columns[name][row] = value
        store.write_metadata(part, new_table(columns))


def _gather_info(items: list[Item]) -> tuple[list[str], np.ndarray]:
    """SHA256 hex digests and (width, height) of ``items``: each process its share, gathered."""
    share = dist.shard_range(len(items))
    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:  # hashing and file reads release the GIL
        infos = list(pool.map(lambda i: file_info(items[i]), share))
    digests = torch.tensor(np.frombuffer(b"".join(d for d, _, _ in infos), np.uint8).reshape(-1, 32).copy())
    sizes = torch.tensor([[w, h] for _, w, h in infos], dtype=torch.int64).reshape(-1, 2)
    digests, sizes = dist.all_gather_varlen(digests), dist.all_gather_varlen(sizes)
    return [bytes(d).hex() for d in digests.numpy()], sizes.numpy()


def _embed_part(model, transform, items: list[Item], options: dict, desc: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(embeddings float16 (n, D), ok (n,), error reason or None per item) on every process."""
    dataset = SourceDataset(items, transform)
    result = embed_dataset(model, dataset, gather=True, desc=desc, **options)
    features = F.normalize(result.features.float(), dim=-1).cpu()
    ok = result.ok.cpu().numpy()
    features[~torch.from_numpy(ok)] = 0
    errors = [None] * len(items)
    if dist.is_main_process():
        for i in np.flatnonzero(~ok):  # undecodable files are few: decoded again here for the reason
            try:
                dataset.load_image(int(i))
                errors[i] = "could not be decoded"
            except BadImageError as error:
                # PIL names the file object it was given ("<_io.BufferedReader name=12>"): the
                # descriptor number differs from run to run, and the path is in the row already.
                errors[i] = re.sub(r" ?<_io\.\w+ name=[^>]*>", "", error.reason or str(error))
    return features.numpy().astype(np.float16), ok, errors


def _known(values: np.ndarray) -> list:
    return [int(v) if v >= 0 else None for v in values]


def _new_manifest(model: str, sha256: str, embedding_size: int, input_size: int) -> dict:
    return {"format_version": FORMAT_VERSION, "model": model, "checkpoint_sha256": sha256,
            "embedding_size": embedding_size,
            "transform": {"name": "eval", "input_size": input_size, "resize": "bicubic shorter side",
                          "crop": "center"},
            "normalised": True, "dtype": "float16", "parts": [], "next_id": 0, "generation": 0,
            "counts": {"rows": 0, "embedded": 0, "errors": 0, "deleted": 0}}


def _counts(store: Store, manifest: dict) -> dict:
    table = store.all_metadata([p["part"] for p in manifest["parts"]], columns=["error", "deleted"])
    deleted = table.column("deleted").to_numpy(zero_copy_only=False)
    live = live_mask(table)
    return {"rows": len(table), "embedded": int(live.sum()), "errors": int((~live & ~deleted).sum()),
            "deleted": int(deleted.sum())}


def embed_collection(sources: list[str], output: str | os.PathLike, model_name: str, *, batch_size: int = 128,
                     num_workers: int = 4, device: str | torch.device = "cpu", precision: str = "fp32",
                     decode: str = "auto", part_size: int = PART_SIZE) -> EmbedSummary:
    """Embed ``sources`` into the collection at ``output`` with ``model_name`` (a registry name
    or a checkpoint path); every process of a torchrun calls it. ``precision``: the autocast of the
    forward pass, or ``int8`` (CPUs: the quantised model of ``load(precision="int8")``). Returns what
    was done."""
    import unicom

    store = Store(output)
    model_id, sha256 = model_identity(model_name)
    manifest = store.read_manifest() if store.exists() else None
    if manifest is not None:
        _check_model(store, manifest, model_id, sha256)
    listing = list_sources(sources)
    model, transform = unicom.load(model_name, device=device, precision="int8" if precision == "int8" else "fp32")
    config = model.config
    if manifest is None:
        manifest = _new_manifest(model_id, sha256, config.embedding_size, config.input_size)
    # int8 embeddings are within a cosine of about 0.999 of fp32 ones: a mix still searches, but say so
    precisions = manifest.setdefault("precisions", [])
    if precision not in precisions:
        if precisions:
            logger.warning("%s was embedded with precision %s; this run adds rows with %s", store.root,
                           ", ".join(precisions), precision)
        precisions.append(precision)
    plan = _plan(store, manifest, listing.items)
    summary = EmbedSummary(unchanged=plan.unchanged, deleted=plan.deleted, skipped=Counter(listing.left_out))
    if dist.is_main_process():
        if plan.rewrites:
            _apply_rewrites(store, plan.rewrites)
            manifest["generation"] += 1
        store.write_manifest(manifest)
    dist.barrier()
    options = dict(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision, decode=decode)
    bar = tqdm(total=len(plan.pending), unit="img", desc="embedding", disable=not dist.is_main_process())
    for start in range(0, len(plan.pending), part_size):
        items = plan.pending[start:start + part_size]
        part = len(manifest["parts"])
        embeddings, ok, errors = _embed_part(model, transform, items, options, desc=f"part {part}")
        digests, sizes = _gather_info(items)
        summary.embedded += int(ok.sum())
        for item, error in zip(items, errors):
            if error is not None:
                summary.skipped["could not be decoded"] += 1
                summary.errors.append(f"{item.path}: {error}")
        if dist.is_main_process():
            ids = np.arange(manifest["next_id"], manifest["next_id"] + len(items), dtype=np.int64)
            store.write_embeddings(part, embeddings)
            store.write_metadata(part, new_table({
                "image_path": [i.path for i in items], "id": ids, "size": [i.size for i in items],
                "mtime": [i.mtime for i in items], "sha256": digests, "width": _known(sizes[:, 0]),
                "height": _known(sizes[:, 1]), "error": errors, "deleted": [False] * len(items)}))
            manifest["parts"].append({"part": part, "rows": len(items)})
            manifest["next_id"] += len(items)
            manifest["generation"] += 1
            store.write_manifest(manifest)
        bar.update(len(items))
    bar.close()
    if dist.is_main_process():
        manifest["counts"] = _counts(store, manifest)
        store.write_manifest(manifest)
    dist.barrier()
    return summary
