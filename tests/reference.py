"""Independent references for the tests: written here, never taken from the library.

Float64 brute force for the retrieval metrics and the kNN vote (full similarity matrices,
Python loops, the documented ranking rule), the published eval transform with its mean and
std written out (Pillow bicubic resize, torchvision's crop offsets, normalisation in float64),
and embeddings of image files through the published model graph (``published_vit.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

try:  # tests/ as a package or as a plain folder on sys.path (pytest's default)
    from .published_vit import PublishedViT
except ImportError:
    from published_vit import PublishedViT

# The published CLIP normalisation, channel order R, G, B (UPSTREAM.md, "Preprocessing").
PUBLISHED_MEAN = (0.48145466, 0.4578275, 0.40821073)
PUBLISHED_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_pixels(rgb: np.ndarray, n_px: int, resize: int | None = None) -> np.ndarray:
    """The published eval transform of an (H, W, 3) uint8 array in float64, (3, n_px, n_px):
    bicubic resize of the shorter side to ``resize`` (default n_px; the longer side truncated
    as torchvision does), centre crop with torchvision's offsets, /255, normalise."""
    resize = n_px if resize is None else resize
    h, w = rgb.shape[:2]
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)  # (width, height)
    resized = np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = int(round((size[1] - n_px) / 2.0)), int(round((size[0] - n_px) / 2.0))
    crop = resized[top : top + n_px, left : left + n_px]
    return ((crop / 255.0 - np.array(PUBLISHED_MEAN)) / np.array(PUBLISHED_STD)).transpose(2, 0, 1)


def ref_sims(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    q, g = q.double(), g.double()
    q = q / q.norm(dim=1, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True)
    return (q @ g.T).numpy()


def ref_ranking(sims_row: np.ndarray, exclude: int | None = None) -> np.ndarray:
    # similarity descending, index ascending (lexsort sorts by the last key first)
    order = np.lexsort((np.arange(len(sims_row)), -sims_row))
    return order[order != exclude] if exclude is not None else order


def ref_retrieval(query, query_labels, gallery=None, gallery_labels=None, ks=(1, 2, 4, 8)) -> dict:
    self_search = gallery is None
    if self_search:
        gallery, gallery_labels = query, query_labels
    sims = ref_sims(query, gallery)
    query_labels, gallery_labels = query_labels.numpy(), gallery_labels.numpy()
    recall = {k: 0 for k in ks}
    ap_sum = rp_sum = 0.0
    lone = 0
    for i in range(len(query)):
        ranked = ref_ranking(sims[i], exclude=i if self_search else None)
        rel = (gallery_labels[ranked] == query_labels[i]).tolist()
        r = sum(rel)
        for k in ks:
            recall[k] += any(rel[:k])
        if r == 0:
            lone += 1
            continue
        ap_sum += sum(sum(rel[: p + 1]) / (p + 1) for p in range(r) if rel[p]) / r
        rp_sum += sum(rel[:r]) / r
    n = len(query)
    scored = n - lone
    return {
        "recall": {k: v / n for k, v in recall.items()},
        "map_at_r": ap_sum / scored if scored else float("nan"),
        "r_precision": rp_sum / scored if scored else float("nan"),
        "num_query": n,
        "num_gallery": len(gallery),
        "num_lone_queries": lone,
    }


def ref_topk(query, gallery, k):
    sims = ref_sims(query, gallery)
    k = min(k, gallery.shape[0])
    idx = np.array([ref_ranking(row)[:k] for row in sims])
    return np.take_along_axis(sims, idx, 1), idx


def ref_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    sims = ref_sims(test, train)
    train_labels, test_labels = train_labels.tolist(), test_labels.tolist()
    out = {}
    for k in ks:
        top1 = top5 = 0
        for i in range(len(test)):
            scores = [0.0] * num_classes
            for j in ref_ranking(sims[i])[:k]:
                scores[train_labels[j]] += math.exp(sims[i, j] / temperature)
            ranked = sorted(range(num_classes), key=lambda c: (-scores[c], c))[: min(5, num_classes)]
            preds = [c for c in ranked if scores[c] > 0]  # a class without a vote is not a prediction
            top1 += preds[0] == test_labels[i]
            top5 += test_labels[i] in preds
        out[k] = {"top1": top1 / len(test), "top5": top5 / len(test)}
    return out


def published_model(checkpoint: str) -> PublishedViT:
    """The published model graph with the weights of a file written by ``unicom.checkpoint.save_model``
    (``{"config": ..., "state_dict": ...}``), read with torch alone."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = PublishedViT(**saved["config"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


@torch.no_grad()
def embed_files(model: PublishedViT, paths: list[str], n_px: int) -> torch.Tensor:
    """(N, D) float64 embeddings of image files, one at a time: RGB, the published pixels, the model."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        x = torch.from_numpy(reference_pixels(rgb, n_px)).float().unsqueeze(0)
        out.append(model(x).double())
    return torch.cat(out)
