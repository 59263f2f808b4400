"""Weighted kNN classification (DINO's ImageNet protocol), with train features sharded across processes.

    torchrun --nproc_per_node 8 knn.py --train-dataset /imagenet/train/ --val-dataset /imagenet/val/ \\
        --num-workers 4 --model-name ViT-B/32

Each process embeds and keeps only its shard of the training set; every process embeds its
shard of the validation set, which is then shared; each process searches its training
shard and the top k are merged exactly (ties by lower training index), so the results are
identical for any number of processes.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Only the flags at import: --help and usage errors answer before torch loads (see .flags).
from .flags import (add_loader_args, add_runtime_args, count_or_all, non_empty, output_dir,
                    parse, positive_float32, positive_int, program_parser, seed)

if TYPE_CHECKING:
    import torch

    from ..evaluate import Embeddings

logger = logging.getLogger("unicom.knn")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = program_parser("knn", __doc__, add_help)
    p.add_argument("--train-dataset", "--train_dataset", dest="train_dataset", required=True, type=non_empty,
                   help="ImageFolder tree of the training images (<root>/<class>/<image>)")
    p.add_argument("--val-dataset", "--val_dataset", dest="val_dataset", required=True, type=non_empty,
                   help="ImageFolder tree of the validation images; classes matched to training by folder name")
    p.add_argument("--nb_knn", "--nb-knn", dest="nb_knn", nargs="+", type=positive_int, default=[10, 20, 100, 200],
                   help="numbers of neighbours to evaluate")
    p.add_argument("--temperature", type=positive_float32, default=0.07,
                   help="voting temperature T: weight exp(sim / T)")
    add_loader_args(p, 256, "images per forward pass", "data loading processes per process", most=4)
    p.add_argument("--model-name", "--model_name", dest="model_name", default="ViT-B/32", type=non_empty,
                   help="a registered model name or a checkpoint path")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="output", type=output_dir)
    p.add_argument("--gather-on-cpu", "--gather_on_cpu", dest="gather_on_cpu", action="store_true",
                   help="keep the training features in host memory and stream them to the device in chunks")
    p.add_argument("--n-per-class-list", "--n_per_class_list", dest="n_per_class_list", nargs="+", type=count_or_all,
                   default=[-1], help="few-shot: training images per class (-1 = all); only the k <= n are evaluated, "
                        "and n itself (said on stderr)")
    p.add_argument("--n-tries", "--n_tries", dest="n_tries", type=positive_int, default=1,
                   help="few-shot: random subsets per n, results averaged")
    p.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=positive_int, default=1024,
                   help="validation images searched at once")
    p.add_argument("--train-chunk-rows", dest="train_chunk_rows", type=positive_int, default=262144,
                   help="with --gather-on-cpu: training rows moved to the device at once")
    p.add_argument("--seed", type=seed, default=0)
    add_runtime_args(p)
    return p


def shard_topk(query: torch.Tensor, train: torch.Tensor, train_ids: torch.Tensor, k: int,
               chunk_size: int, stream_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (sims, global ids) of ``query`` among this process's training rows.

    With ``stream_rows`` the training rows stay where they are (host memory) and are moved
    to the query's device ``stream_rows`` at a time; partial results are merged exactly.
    """
    import torch

    from ..metrics import knn_topk, merge_topk

    if train.shape[0] == 0:
        return query.new_empty(query.shape[0], 0), torch.empty(query.shape[0], 0, dtype=torch.long,
                                                               device=query.device)
    if stream_rows is None:
        sims, idx = knn_topk(query, train, k, chunk_size)
        return sims, train_ids[idx]
    best_sims, best_ids = None, None
    for start in range(0, train.shape[0], stream_rows):
        block = train[start:start + stream_rows].to(query.device, non_blocking=True)
        ids = train_ids[start:start + stream_rows].to(query.device, non_blocking=True)
        sims, idx = knn_topk(query, block, k, chunk_size)
        if best_sims is None:
            best_sims, best_ids = sims, ids[idx]
        else:
            best_sims, best_ids = merge_topk(torch.cat([best_sims, sims], 1), torch.cat([best_ids, ids[idx]], 1), k)
    return best_sims, best_ids


def global_topk(query: torch.Tensor, train: Embeddings, k: int, chunk_size: int,
                stream_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the training rows of all processes: search the local shard, gather, merge."""
    from .. import _distributed as dist
    from ..metrics import merge_topk

    sims, ids = shard_topk(query, train.features, train.indices, k, chunk_size, stream_rows)
    # (k_local, Q) rows gathered from every process -> (sum k_local, Q) -> (Q, sum k_local)
    sims = dist.all_gather_varlen(sims.t().contiguous()).t()
    ids = dist.all_gather_varlen(ids.t().contiguous()).t()
    return merge_topk(sims, ids, k)


def few_shot_subset(labels: torch.Tensor, valid: torch.Tensor, n_per_class: int, seed: int) -> torch.Tensor:
    """A boolean mask over training ids: n_per_class random valid images of every class (same on all ranks)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    ids = torch.nonzero(valid).squeeze(1)
    for c in torch.unique(labels[ids]).tolist():
        members = ids[labels[ids] == c]
        mask[members[torch.randperm(members.numel(), generator=generator)[:n_per_class]]] = True
    return mask


def evaluate(model, train_set, val_set, args, device) -> dict:
    """kNN accuracies for each k (and each few-shot subset), as fractions."""
    import torch

    from .. import _distributed as dist
    from ..evaluate import embed_dataset
    from ..metrics import knn_vote_accuracy
    from .common import embedding_options

    start = time.perf_counter()
    options = embedding_options(args, device)
    train = embed_dataset(model, train_set, gather=False, desc="train", **options).valid()  # this process's shard
    val = embed_dataset(model, val_set, desc="val", **options)
    seconds_embed = time.perf_counter() - start
    num_train = int(dist.all_reduce_sum(torch.tensor([train.features.shape[0]], device=device)).item())
    skipped_train = len(train_set) - num_train
    skipped_val = val.num_skipped
    val = val.valid()
    train.features = torch.nn.functional.normalize(train.features, dim=1)
    if args.gather_on_cpu:
        train.features = train.features.cpu()
        train.indices = train.indices.cpu()
    # Every process needs the label of any training id to vote: labels are small, gather them.
    all_labels = torch.full((len(train_set),), -1, dtype=torch.long, device=device)
    all_labels[dist.all_gather_varlen(train.indices.to(device))] = dist.all_gather_varlen(train.labels)
    num_classes = len(train_set.classes)
    max_k = max(args.nb_knn)
    results: dict = {"knn": {}, "few_shot": {}}
    for n_per_class in args.n_per_class_list:
        tries = [None] if n_per_class < 0 else list(range(args.n_tries))
        ks = args.nb_knn if n_per_class < 0 else sorted({k for k in [*args.nb_knn, n_per_class] if k <= n_per_class})
        dropped = [k for k in args.nb_knn if k not in ks]
        if n_per_class > 0 and dropped and dist.is_main_process():
            logger.warning("few-shot with %d per class: k is capped at %d, so %s-NN %s not evaluated there "
                           "(evaluated: %s-NN)", n_per_class, n_per_class, ", ".join(map(str, dropped)),
                           "is" if len(dropped) == 1 else "are", ", ".join(map(str, ks)))
        per_try = []
        for t in tries:
            subset = train
            if t is not None:
                mask = few_shot_subset(all_labels.cpu(), all_labels.cpu() >= 0, n_per_class, seed=args.seed + t)
                keep = mask[train.indices.cpu()].to(train.indices.device)
                subset = train.select(keep)
            sims, ids = global_topk(val.features, subset, max(ks) if t is not None else max_k, args.chunk_size,
                                    args.train_chunk_rows if args.gather_on_cpu else None)
            per_try.append(knn_vote_accuracy(sims, all_labels[ids.to(device)], val.labels, ks, args.temperature,
                                             num_classes, args.chunk_size))
        averaged = {k: {m: sum(r[k][m] for r in per_try) / len(per_try) for m in ("top1", "top5")} for k in ks}
        if n_per_class < 0:
            results["knn"] = averaged
        else:
            results["few_shot"][n_per_class] = averaged
    results.update(num_train=num_train, num_val=val.features.shape[0], skipped_images=skipped_train + skipped_val,
                   images_per_second=(len(train_set) + len(val_set)) / max(seconds_embed, 1e-9),
                   seconds=time.perf_counter() - start)
    return results


def _percent(table: dict) -> dict:
    return {str(k): {m: 100.0 * v for m, v in r.items()} for k, r in table.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse(get_args_parser(), argv)
    import torch

    from .. import _distributed as dist
    from .._utils import write_json
    from ..data import load_image_folder
    from .common import check_images, load_for_embedding, runtime_record, process_group

    with process_group(args.device) as device:
        torch.manual_seed(args.seed)
        model, transform = load_for_embedding(args.model_name, device, args.precision, compile=args.compile)
        train_set = load_image_folder(args.train_dataset, transform, args.skip_bad_images)
        val_set = load_image_folder(args.val_dataset, transform, args.skip_bad_images,
                                    class_to_idx={c: i for i, c in enumerate(train_set.classes)})
        damaged = check_images([train_set, val_set], args.strict_images)
        result = evaluate(model, train_set, val_set, args, device)
        if dist.is_main_process():
            record = {
                **damaged,
                "model": str(args.model_name),
                "num_train": result["num_train"],
                "num_val": result["num_val"],
                "temperature": args.temperature,
                "world_size": dist.get_world_size(),
                "knn": _percent(result["knn"]),
                "skipped_images": result["skipped_images"],
                "images_per_second": result["images_per_second"],
                "seconds": result["seconds"],
                **runtime_record(args, device),
            }
            if result["few_shot"]:
                record["few_shot"] = {str(n): _percent(t) for n, t in result["few_shot"].items()}
            for k, r in record["knn"].items():
                print(f"{k:>4}-NN  top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}")
            for n, table in record.get("few_shot", {}).items():
                for k, r in table.items():
                    print(f"{n:>4} per class {k:>4}-NN  top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}")
            write_json(record, Path(args.output_dir) / "results_eval_knn.json")
        dist.barrier()
        return 0
