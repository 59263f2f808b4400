"""Synthetic collections for the collection benchmarks: clustered unit vectors with planted near
duplicates, written in the collection format (no images, no model)."""

from __future__ import annotations

import numpy as np

__all__ = ["clustered", "planted_pairs"]


def clustered(n: int, dim: int = 512, centers: int = 1000, dup_fraction: float = 0.02, seed: int = 0,
              chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors around ``centers`` cluster centres (neighbours in a cluster
    have cosine ~0.7), and the (copy, source) positions of the planted near duplicates: each a
    copy of another row plus noise (cosine ~0.97 to its source)."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x[start:start + m] = middle[rng.integers(0, centers, m)] + 0.6 * rng.standard_normal((m, dim), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    count = int(n * dup_fraction)
    chosen = rng.choice(n, 2 * count, replace=False)
    copies, sources = chosen[:count], chosen[count:]
    noisy = x[sources] + 0.01 * rng.standard_normal((count, dim), np.float32)
    x[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return x, np.stack([copies, sources], 1)


def planted_pairs(pairs: np.ndarray) -> set[tuple[int, int]]:
    return {(int(min(a, b)), int(max(a, b))) for a, b in pairs}
