"""Retrieval metrics and the weighted kNN classifier, as pure tensor functions.

Conventions shared by every function here:

* Embeddings are L2-normalised inside the functions (callers may pass raw model outputs),
  and similarity is the cosine similarity. Inputs of any float dtype are accepted;
  similarities are computed in float64 when an input is float64 and in float32 otherwise
  (float16/bfloat16 inputs are upcast, never multiplied in half precision).
* Work happens on the device of the inputs. Queries are processed in chunks of
  ``chunk_size`` rows against the whole gallery, so memory is bounded by one
  ``chunk_size x num_gallery`` similarity block; no ``N x N`` matrix is ever built.
* Ranking rule (deterministic): similarity descending, ties broken by gallery index
  ascending. ``torch.topk`` does not promise that order for equal values, so each chunk
  checks whether values equal to its k-th value were left out; such rows (rare on real
  data, common with duplicate embeddings) are re-ranked with a full stable sort after the
  main pass, which keeps the main pass free of host synchronisation.
* Self-exclusion (query set == gallery) is by index: query ``i`` never sees gallery row
  ``i``, while a duplicate of it at another index is ranked like any other item.

Nothing here knows about processes: sharded search is ``knn_topk`` per shard, a gather by
the caller, and ``merge_topk``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_accuracy", "knn_classify", "knn_topk", "knn_vote_accuracy", "merge_topk", "retrieval_metrics"]

logger = logging.getLogger(__name__)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float64 inputs keep float64 (exact comparisons against references); everything
    # narrower is computed in float32, which is exact enough for ranking.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _normalise(x: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_items, dim), got shape {tuple(x.shape)}")
    return F.normalize(x.to(dtype), dim=1)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _sort_by_rank(sims: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Order candidate lists by the ranking rule: similarity descending, index ascending.

    sims, indices: (Q, M). Two stable sorts: by index first, then by similarity, so equal
    similarities keep ascending index order.
    """
    order = indices.argsort(dim=1, stable=True)
    sims, indices = sims.gather(1, order), indices.gather(1, order)
    order = sims.argsort(dim=1, descending=True, stable=True)
    return sims.gather(1, order), indices.gather(1, order)


def _order_ties(sims: Tensor, indices: Tensor, num_gallery: int) -> Tensor:
    """Permutation putting equal similarities in ascending index order.

    sims, indices: (c, k), sims already sorted descending. Ranks the composite key
    (run of equal values, index); one int64 sort, cheaper than two stable sorts.
    """
    runs = torch.zeros_like(indices)  # (c, k) id of each run of equal similarities
    runs[:, 1:] = (sims[:, 1:] != sims[:, :-1]).cumsum(dim=1)
    return (runs * num_gallery + indices).argsort(dim=1)


def _block_size(num_gallery: int, k: int) -> int:
    """Columns per block of the two-stage selection (1: plain topk over the whole row).

    Selecting k of N costs about N / m (block maxima) + k * m (candidates) beyond the one
    pass that takes the maxima; m = sqrt(N / k) balances the two. Below m = 4 the saving
    does not pay for the extra passes.
    """
    m = round(math.sqrt(num_gallery / k))
    return m if m >= 4 else 1


def _select(block: Tensor, k: int, m: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of ``block`` (c, m * B), sorted descending.

    With m > 1 the columns fall into B blocks of m, block b holding columns b, b + B, ...:
    the k blocks with the largest maxima hold the k largest values (any value they miss is
    <= the k-th largest block maximum, which is <= the k-th largest value, so it can only
    tie with it), and the final topk runs over their k * m columns instead of the whole
    row. The values are exactly those of a plain topk; only which of several equal k-th
    values is kept may differ, and the caller resolves such ties anyway. Strided blocks make
    the maxima an elementwise max of m contiguous slices (vectorised, unlike a max over
    short runs).
    """
    if m == 1:
        return torch.topk(block, k, dim=1, largest=True, sorted=True)
    rows, width = block.shape
    num_blocks = width // m
    maxima = block.view(rows, m, num_blocks).amax(dim=1)  # (c, B)
    top_blocks = torch.topk(maxima, k, dim=1, sorted=False).indices  # (c, k)
    offsets = torch.arange(0, width, num_blocks, device=block.device)  # (m,)
    cols = (top_blocks.unsqueeze(2) + offsets).view(rows, k * m)  # (c, k*m) candidates
    vals, pos = torch.topk(block.gather(1, cols), k, dim=1, largest=True, sorted=True)
    return vals, cols.gather(1, pos)


def _search(
    query: Tensor, gallery: Tensor, k: int, chunk_size: int, exclude_self: bool
) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
    """Yield the top-k gallery rows of every query under the ranking rule.

    query (Q, D) and gallery (N, D) are already normalised, of one dtype, and 1 <= k <= the
    number of rankable gallery rows. Yields ``(rows, sims (c, k), indices (c, k))``, rows a
    slice or an index tensor. The main pass yields every query once; rows that had a tie
    straddling the k-th place are yielded again, correct, in a second pass. Consumers write
    per-query results into (Q, ...) buffers, so later yields simply overwrite earlier ones.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    gallery_t = gallery.t()  # (D, N) view; BLAS reads it transposed
    # One extra rank tells whether ties matter: topk keeps arbitrary members among values
    # equal to the k-th one, and if the (k+1)-th value equals the k-th, an equal value was
    # left out and the lowest indices may be missing.
    k_search = min(k + 1, num_gallery)
    m = _block_size(num_gallery, k_search)
    width = -(-num_gallery // m) * m  # whole blocks
    # One reusable (chunk, width) buffer: allocating ~0.5 GB per chunk costs page faults on
    # CPUs. Rows are padded to 64 bytes, which speeds up the matmul writing into them, and
    # the padding columns hold -inf for good (the matmul only writes the first N).
    stride = -(-width // 16) * 16
    buffer = torch.full((min(chunk_size, num_query), stride), float("-inf"), dtype=query.dtype, device=query.device)
    tied_masks = [torch.zeros(0, dtype=torch.bool, device=query.device)]
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        block = buffer[: stop - start, :width]  # (c, width) view
        torch.mm(query[start:stop], gallery_t, out=block[:, :num_gallery])  # (c, N) similarities
        if exclude_self:
            diag = torch.arange(stop - start, device=query.device)
            block[diag, diag + start] = float("-inf")
        vals, idx = _select(block, k_search, m)  # (c, k+1)
        if k_search > k:
            tied_masks.append(vals[:, k] == vals[:, k - 1])
            vals, idx = vals[:, :k], idx[:, :k]
        order = _order_ties(vals, idx, num_gallery)  # ties inside the top k
        yield slice(start, stop), vals.gather(1, order), idx.gather(1, order)
    buffer = block = None  # free the (chunk, N) buffer before the second pass

    tied_rows = torch.cat(tied_masks).nonzero().squeeze(1)  # the pass's one host sync
    if tied_rows.numel():
        logger.debug("re-ranking %d queries with ties at the k-th place", tied_rows.numel())
    for start in range(0, tied_rows.numel(), chunk_size):
        rows = tied_rows[start : start + chunk_size]
        sims = query[rows] @ gallery_t  # (c, N)
        if exclude_self:
            sims[torch.arange(rows.numel(), device=query.device), rows] = float("-inf")
        # A stable descending sort ranks equal values by ascending index: exactly the rule.
        vals, idx = sims.sort(dim=1, descending=True, stable=True)
        yield rows, vals[:, :k].contiguous(), idx[:, :k].contiguous()


def _retrieval_inputs(
    query: Tensor, query_labels: Tensor, gallery: Tensor | None, gallery_labels: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Checked, normalised embeddings of one dtype and compact label ids shared by both sides.

    Without a gallery the queries are the gallery. Returns ``(query (Q, D), gallery (N, D),
    query_ids (Q,), gallery_ids (N,), gallery_counts (labels,))``.
    """
    exclude_self = gallery is None
    if exclude_self:
        if gallery_labels is not None:
            raise ValueError("gallery_labels given without gallery")
        gallery_labels = query_labels
    elif gallery_labels is None:
        raise ValueError("gallery given without gallery_labels")

    dtype = _compute_dtype(query, *(() if gallery is None else (gallery,)))
    query_n = _normalise(query, dtype, "query")
    gallery_n = query_n if exclude_self else _normalise(gallery, dtype, "gallery")
    num_query, num_gallery = query_n.shape[0], gallery_n.shape[0]
    if num_query == 0:
        raise ValueError("no queries")
    if gallery_n.shape[1] != query_n.shape[1]:
        raise ValueError(f"query dim {query_n.shape[1]} != gallery dim {gallery_n.shape[1]}")
    if query_labels.shape != (num_query,) or gallery_labels.shape != (num_gallery,):
        raise ValueError("labels must be 1-D with one entry per embedding")
    device = query_n.device
    # Compact label ids shared by queries and gallery, so counts are a bincount.
    all_labels = torch.cat([query_labels.to(device).long(), gallery_labels.to(device).long()])
    label_ids = torch.unique(all_labels, return_inverse=True)[1]
    gallery_counts = torch.bincount(label_ids[num_query:], minlength=int(label_ids.max()) + 1)
    return query_n, gallery_n, label_ids[:num_query], label_ids[num_query:], gallery_counts


def _ranking_hits(query: Tensor, gallery: Tensor, query_ids: Tensor, gallery_ids: Tensor, k: int, chunk_size: int,
                  exclude_self: bool) -> Tensor:
    """Whether each of the first ``k`` results of each query has its label: (Q, k) bool."""
    # Same-label flags of each query's ranking, (Q, k) bools: small next to the search's
    # chunk x N block. The metrics then take a few large ops rather than a few per chunk (on
    # a busy CPU every parallel op can cost a scheduler slice), and as per-query values
    # reduced once at the end they do not depend on chunk_size, to the last bit. (The rankings
    # themselves come from matrix products whose rounding may depend on the chunk's shape: two
    # similarities equal in exact arithmetic, say of duplicate gallery images, can differ in
    # their last bit and be ranked either way.)
    hits = torch.zeros(query.shape[0], k, dtype=torch.bool, device=query.device)
    if k > 0:
        for rows, _, idx in _search(query, gallery, k, chunk_size, exclude_self):
            hits[rows] = gallery_ids[idx] == query_ids[rows].unsqueeze(1)  # (c, k)
    return hits


def _precision_at_r(hits: Tensor, num_relevant: Tensor, max_relevant: int) -> tuple[Tensor, Tensor]:
    """AP@R and R-precision of each query, (Q,) float64, from its ranking's same-label flags.

    ``hits`` (Q, k >= max_relevant) bool; ``num_relevant`` (Q,) is R. Lone rows (R = 0) are 0.
    """
    num_query, device = hits.shape[0], hits.device
    ap = torch.zeros(num_query, dtype=torch.float64, device=device)  # AP@R
    rp = torch.zeros(num_query, dtype=torch.float64, device=device)  # R-precision
    if max_relevant > 0:
        positions = torch.arange(1, max_relevant + 1, device=device)  # (R_max,) ranks 1..R_max
        step = max(1, (1 << 24) // max_relevant)  # bounds the (rows, R_max) temporaries
        for start in range(0, num_query, step):
            rows = slice(start, start + step)
            r = num_relevant[rows]  # (c,)
            top = hits[rows, :max_relevant]  # (c, R_max): MAP@R and R-precision stop at R
            cum_hits = top.cumsum(dim=1)  # (c, R_max) hits within the first i ranks
            in_r = positions <= r.unsqueeze(1)  # (c, R_max)
            r_safe = r.clamp(min=1).double()  # lone rows are masked out below
            ap[rows] = (cum_hits.double() / positions).mul_(top & in_r).sum(dim=1) / r_safe
            rp[rows] = cum_hits.gather(1, (r - 1).clamp(min=0).unsqueeze(1)).squeeze(1) / r_safe
    return ap, rp


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
) -> dict:
    """Recall@K, MAP@R and R-precision of a retrieval, as fractions.

    Args:
        query: (Q, D) query embeddings, any float dtype; L2-normalised here.
        query_labels: (Q,) integer labels.
        gallery: (N, D) gallery embeddings, or None to search the queries themselves
            (CUB, Cars, SOP, iNaturalist), in which case query ``i`` is excluded from its own
            ranking by index. With a gallery (In-Shop) nothing is excluded.
        gallery_labels: (N,) integer labels, required with ``gallery``, sharing the label
            space of ``query_labels``.
        ks: the K of Recall@K. A K beyond the number of rankable gallery items is clamped
            to it (Recall@K then asks whether any same-label item exists at all).
        chunk_size: queries ranked at a time; memory is about chunk_size x N similarities
            plus Q x max(max(ks), max R) bools.

    Returns:
        ``{"recall": {k: float}, "map_at_r": float, "r_precision": float, "num_query": int,
        "num_gallery": int, "num_lone_queries": int}``.

    R of a query is the number of gallery items other than itself with its label. Lone
    queries (R = 0) count as misses in Recall@K (they are in its denominator) and are left
    out of the MAP@R and R-precision averages; ``num_lone_queries`` says how many there
    were, and both averages are NaN when every query is lone. Ranking: cosine similarity
    descending, ties broken by lower gallery index.
    """
    _check_chunk_size(chunk_size)
    ks = _check_ks(ks)
    exclude_self = gallery is None
    query_n, gallery_n, query_ids, gallery_ids, gallery_counts = _retrieval_inputs(
        query, query_labels, gallery, gallery_labels)
    num_query, num_gallery = query_n.shape[0], gallery_n.shape[0]
    device = query_n.device
    num_relevant = gallery_counts[query_ids] - int(exclude_self)  # R, (Q,)

    num_rankable = num_gallery - int(exclude_self)
    # Ranks beyond max(K) and max(R) never matter; fetch that many (one host sync, up front).
    max_relevant = int(num_relevant.max())
    k_fetch = min(max(max(ks), max_relevant), num_rankable)
    k_used = torch.tensor([min(k, k_fetch) for k in ks], device=device)  # (len(ks),)

    hits = _ranking_hits(query_n, gallery_n, query_ids, gallery_ids, k_fetch, chunk_size, exclude_self)
    # argmax returns the first maximum: the 0-based rank of the first hit.
    first_hit = torch.full((num_query,), k_fetch, dtype=torch.long, device=device)
    if k_fetch > 0:
        first_hit = torch.where(hits.any(dim=1), hits.to(torch.uint8).argmax(dim=1), first_hit)
    ap, rp = _precision_at_r(hits, num_relevant, max_relevant)

    # Lone queries have no hit, so they are misses of Recall@K by construction.
    recall_hits = (first_hit.unsqueeze(1) < k_used).sum(dim=0)  # (len(ks),)
    scored = num_relevant > 0
    num_scored = scored.sum()
    # One transfer for everything.
    values = torch.cat(
        [
            recall_hits.double() / num_query,
            (ap[scored].sum() / num_scored).reshape(1),
            (rp[scored].sum() / num_scored).reshape(1),
            (num_query - num_scored).double().reshape(1),
        ]
    ).tolist()
    return {
        "recall": dict(zip(ks, values[: len(ks)])),
        "map_at_r": values[len(ks)],  # 0 / 0 = NaN when every query is lone
        "r_precision": values[len(ks) + 1],
        "num_query": num_query,
        "num_gallery": num_gallery,
        "num_lone_queries": int(values[-1]),
    }


def knn_topk(query: Tensor, gallery: Tensor, k: int, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The k most similar gallery rows of each query, by cosine similarity.

    Args:
        query: (Q, D) embeddings; gallery: (N, D) embeddings; both L2-normalised here.
        k: neighbours per query, clamped to N.
        chunk_size: queries ranked at a time.

    Returns:
        ``(sims, indices)``, both (Q, min(k, N)), sorted by similarity descending with ties
        broken by lower gallery index. ``sims`` is float64 if an input is, else float32.
    """
    _check_chunk_size(chunk_size)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dtype = _compute_dtype(query, gallery)
    query_n, gallery_n = _normalise(query, dtype, "query"), _normalise(gallery, dtype, "gallery")
    if gallery_n.shape[1] != query_n.shape[1]:
        raise ValueError(f"query dim {query_n.shape[1]} != gallery dim {gallery_n.shape[1]}")
    num_query, num_gallery = query_n.shape[0], gallery_n.shape[0]
    k = min(k, num_gallery)
    sims = torch.empty(num_query, k, dtype=dtype, device=query_n.device)
    indices = torch.empty(num_query, k, dtype=torch.long, device=query_n.device)
    if k == 0 or num_query == 0:
        return sims, indices
    for rows, vals, idx in _search(query_n, gallery_n, k, chunk_size, exclude_self=False):
        sims[rows], indices[rows] = vals, idx  # second-pass rows overwrite their first pass
    return sims, indices


def merge_topk(sims: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the top k of concatenated candidate lists, e.g. per-shard ``knn_topk`` results.

    Args:
        sims: (Q, M) similarities, candidate lists concatenated along dim 1.
        indices: (Q, M) their global gallery indices.
        k: how many to keep, clamped to M.

    Returns:
        ``(sims, indices)`` of shape (Q, min(k, M)), similarity descending, ties broken by
        lower global index, so a search split into any number of shards (each returning its
        own top k) merges to the same result as one search over the whole gallery.
    """
    if sims.shape != indices.shape or sims.ndim != 2:
        raise ValueError(f"sims {tuple(sims.shape)} and indices {tuple(indices.shape)} must be equal 2-D shapes")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims, indices = _sort_by_rank(sims, indices)
    return sims[:, :k], indices[:, :k]


def knn_classify(sims: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float = 0.07) -> Tensor:
    """Class scores of DINO's weighted kNN vote.

    Args:
        sims: (Q, k) cosine similarities of each query's neighbours; every column votes.
        neighbour_labels: (Q, k) class index (0 <= label < num_classes) of each neighbour.
        num_classes: C.
        temperature: T; a neighbour votes for its class with weight exp(sim / T).

    Returns:
        (Q, C) scores, float64 if ``sims`` is, else float32. To stay finite for any T, each
        row is scaled by exp(-max_sim / T): the best neighbour weighs 1. That scale is the
        same for every class of a row, so rankings equal those of DINO's raw sums.
    """
    if sims.shape != neighbour_labels.shape or sims.ndim != 2 or sims.shape[1] == 0:
        raise ValueError("sims and neighbour_labels must have equal (Q, k) shapes with k >= 1")
    dtype = torch.float64 if sims.dtype == torch.float64 else torch.float32
    # Checked in the dtype it is used in: 1e-300 is > 0 as a Python float but 0 in float32.
    if not (math.isfinite(temperature) and 0 < torch.tensor(temperature, dtype=dtype).item() < math.inf):
        raise ValueError(f"temperature must be a finite number > 0 in {dtype}, got {temperature}")
    sims = sims.to(dtype)
    weights = torch.exp((sims - sims.max(dim=1, keepdim=True).values) / temperature)  # (Q, k) in (0, 1]
    scores = torch.zeros(sims.shape[0], num_classes, dtype=dtype, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels.to(sims.device).long(), weights)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy of the weighted kNN classifier (DINO's ImageNet protocol).

    One search for max(ks) neighbours of every test embedding among the training ones, then
    a vote of the first k neighbours for each k. A k beyond the training set size is clamped
    to it (all training items vote). Top-5 means the first min(5, C) classes by score, among
    those that got a vote: a class no neighbour voted for is never a prediction (DINO sorts
    all C scores, so with fewer than 5 voted classes its top-5 also counts zero-score classes
    in whatever order the sort leaves them). Predictions rank classes by score descending,
    ties broken by lower class index.

    Args:
        train_features: (N, D); train_labels: (N,) class indices.
        test_features: (Q, D); test_labels: (Q,) class indices.
        ks: neighbour counts to evaluate.
        temperature: vote temperature T.
        num_classes: C; by default 1 + the largest label seen.
        chunk_size: test rows ranked (and voted) at a time.

    Returns:
        ``{k: {"top1": float, "top5": float}}`` as fractions, keyed by the ks given.
    """
    _check_chunk_size(chunk_size)
    if test_features.shape[0] == 0 or train_features.shape[0] == 0:
        raise ValueError("need at least one training and one test embedding")
    device = test_features.device
    train_labels, test_labels = train_labels.to(device).long(), test_labels.to(device).long()
    if num_classes is None:
        num_classes = int(torch.maximum(train_labels.max(), test_labels.max())) + 1
    ks = _check_ks(ks)
    sims, idx = knn_topk(test_features, train_features, max(ks), chunk_size)  # (Q, k_max)
    return knn_vote_accuracy(sims, train_labels[idx], test_labels, ks, temperature, num_classes, chunk_size)


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


def knn_vote_accuracy(
    sims: Tensor, neighbour_labels: Tensor, test_labels: Tensor, ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy of the weighted kNN vote, given each query's neighbours.

    The half of :func:`knn_accuracy` after the search, for callers that searched themselves
    (e.g. over training shards on several processes, merged with :func:`merge_topk`).

    Args:
        sims: (Q, K) similarities of each test item's neighbours, best first.
        neighbour_labels: (Q, K) their class indices.
        test_labels: (Q,) true class indices.
        ks: neighbour counts to evaluate; a k beyond K is clamped to K.
        temperature, num_classes, chunk_size: as in :func:`knn_accuracy`.

    Returns:
        ``{k: {"top1": float, "top5": float}}`` as fractions.
    """
    _check_chunk_size(chunk_size)
    ks = _check_ks(ks)
    num_test = test_labels.shape[0]
    if num_test == 0 or sims.shape[1] == 0:
        raise ValueError("need at least one test item and one neighbour")
    device = sims.device
    test_labels, neighbour_labels = test_labels.to(device).long(), neighbour_labels.to(device).long()
    if num_classes is None:
        num_classes = int(torch.maximum(neighbour_labels.max(), test_labels.max())) + 1
    num_top = min(5, num_classes)
    k_max = sims.shape[1]
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=device)  # (top1, top5) per k
    for start in range(0, num_test, chunk_size):  # bounds the (chunk, C) score block
        rows = slice(start, start + chunk_size)
        target = test_labels[rows].unsqueeze(1)  # (c, 1)
        for i, k in enumerate(ks):
            k = min(k, k_max)
            scores = knn_classify(sims[rows, :k], neighbour_labels[rows, :k], num_classes, temperature)
            top = scores.argsort(dim=1, descending=True, stable=True)[:, :num_top]  # (c, top)
            # A class no neighbour voted for is not a prediction: with fewer than 5 voted classes
            # (k < 5, or neighbours of few classes) top-5 looks at the voted ones only.
            hit = (top == target) & (scores.gather(1, top) > 0)
            correct[i, 0] += hit[:, 0].sum()
            correct[i, 1] += hit.any(dim=1).sum()
    fractions = (correct.double() / num_test).tolist()
    return {k: {"top1": top1, "top5": top5} for k, (top1, top5) in zip(ks, fractions)}
