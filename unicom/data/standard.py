"""The standard size of each retrieval benchmark and its customary Recall@K: data, not code.

A loaded split whose counts differ from these still runs (a subset is useful for quick
checks) but warns, so a half-extracted archive is not mistaken for the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counts:
    """Images and classes of one split; ``gallery`` only where queries search a separate set."""

    images: int  # the query images (the whole split when it is its own gallery)
    classes: int
    gallery: int | None = None


@dataclass(frozen=True)
class Standard:
    ks: tuple[int, ...]  # customary Recall@K
    train: Counts
    test: Counts


STANDARD: dict[str, Standard] = {
    "cub": Standard((1, 2, 4, 8), Counts(5_864, 100), Counts(5_924, 100)),
    "car": Standard((1, 2, 4, 8), Counts(8_054, 98), Counts(8_131, 98)),
    "sop": Standard((1, 10, 100, 1000), Counts(59_551, 11_318), Counts(60_502, 11_316)),
    "inshop": Standard(
        (1, 10, 20, 30, 40, 50), Counts(25_882, 3_997), Counts(14_218, 3_985, gallery=12_612)
    ),
    # iNaturalist 2018 has 8,142 classes: 5,690 for training, the other 2,452 for testing.
    "inat": Standard((1, 4, 16, 32), Counts(325_846, 5_690), Counts(136_093, 2_452)),
    # scikit-learn's bundled digits: 1,797 images, digits 0-4 train, 5-9 test.
    "digits": Standard((1, 2, 4, 8), Counts(901, 5), Counts(896, 5)),
}
