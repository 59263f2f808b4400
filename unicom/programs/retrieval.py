"""Zero-shot retrieval evaluation (``--eval``) and supervised fine-tuning on a retrieval benchmark.

    torchrun --nproc_per_node 8 retrieval.py --eval --dataset cub --model_name ViT-B/32
    python retrieval.py --eval --dataset digits --model_name ViT-B/32
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed as dist
from ..data import RetrievalDataset, load_retrieval_dataset
from ..data.pipelines import embedding_loader
from ..data.registry import available_datasets
from ..embed import Embeddings, embed_loader, gather_embeddings
from ..factory import load
from ..metrics import retrieval_metrics
from .common import (add_runtime_args, check_images, non_empty, non_negative_int, output_dir, positive_int,
                     resolve_precision, runtime_record, seed, setup_logging, write_json)
from .finetune import PUBLISHED_RUNS, add_train_args, published_settings, train

logger = logging.getLogger("unicom.retrieval")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("retrieval", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", action="store_true", help="zero-shot evaluation only (no fine-tuning)")
    p.add_argument("--published", action="store_true",
                   help="fine-tuning: start from the published script's settings for --dataset and --model_name "
                        "(batch per process, epochs, lr, margins, num_feat, transform, ...); flags given here win")
    p.add_argument("--dataset", default="cub", help=f"one of {', '.join(available_datasets())}")
    p.add_argument("--data-root", "--data_root", dest="data_root", default="data",
                   help="folder holding the datasets in their standard layouts (default: data)")
    p.add_argument("--model_name", "--model-name", dest="model_name", default="ViT-B/16", type=non_empty,
                   help="a registered model name or a checkpoint path")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=positive_int, default=128,
                   help="images per process per step")
    p.add_argument("--num_workers", "--num-workers", dest="num_workers", type=non_negative_int, default=8,
                   help="data loading processes per process")
    p.add_argument("--num_feat", type=positive_int, default=None,
                   help="use only the first num_feat embedding dimensions (as trained with feature sampling)")
    p.add_argument("--output", default="output", type=output_dir, help="folder for results.json (and checkpoints)")
    p.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=positive_int, default=1024,
                   help="queries searched at once: bounds memory to chunk x gallery similarities")
    p.add_argument("--visualize", type=non_negative_int, default=0, metavar="N",
                   help="write <output>/retrieval_examples.png with N random queries and their top results")
    p.add_argument("--seed", type=seed, default=1024)
    add_runtime_args(p)
    add_train_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with ``--published``, the published run's settings fill in every flag not given."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.eval and args.epochs == 0:
        parser.error("argument --epochs: fine-tuning needs at least 1 epoch")
    if not args.published:
        return args
    if args.eval:
        parser.error("--published sets fine-tuning flags; zero-shot --eval has none to set")
    try:
        settings = published_settings(args.dataset, args.model_name)
    except ValueError as error:
        parser.error(str(error))
    parser.set_defaults(**settings)
    return parser.parse_args(argv)  # what the command line says still wins


def _compare_with_published(args) -> None:
    """Say so when this run's global batch differs from the published run's (ArcFace over Partial FC
    sees every process's batch at once: its size is part of the setting)."""
    run = PUBLISHED_RUNS[(args.dataset, args.model_name)]
    processes, published = run["processes"], run["processes"] * run["batch_size"]
    world = dist.get_world_size()
    if world * args.batch_size != published:
        logger.warning("the published run used %d process(es) x %d images (%d per step); this one %d x %d (%d): "
                       "results may differ from the published numbers", processes, published // processes,
                       published, world, args.batch_size, world * args.batch_size)


def embed_dataset(model, dataset, args, device, precision: str, desc: str) -> Embeddings:
    """Embed ``dataset`` sharded across processes; every process gets all rows, in dataset order."""
    loader, preprocess = embedding_loader(dataset, args.decode, args.batch_size, args.num_workers, device)
    local = embed_loader(model, loader, device, precision, desc=desc, preprocess=preprocess,
                         batch_size=args.batch_size)
    gathered = gather_embeddings(local)
    order = torch.arange(len(dataset), device=gathered.indices.device)
    if not torch.equal(gathered.indices, order):
        raise RuntimeError("internal error: gathered embeddings are not in dataset order")
    return gathered


@dataclass
class Evaluation:
    """The metrics of one evaluation (fractions) and the embeddings they came from (valid rows)."""

    metrics: dict
    query: Embeddings
    gallery: Embeddings | None


def run_evaluation(model, data: RetrievalDataset, args, device: torch.device, precision: str) -> Evaluation:
    """Embed query (and gallery) sets and compute Recall@K, MAP@R and R-precision (fractions)."""
    start = time.perf_counter()
    query = embed_dataset(model, data.query, args, device, precision, "query")
    gallery = embed_dataset(model, data.gallery, args, device, precision, "gallery") if data.gallery else None
    seconds_embed = time.perf_counter() - start
    num_images = len(data.query) + (len(data.gallery) if data.gallery else 0)
    skipped = query.num_skipped + (gallery.num_skipped if gallery else 0)
    if skipped:
        logger.warning("left out %d images that could not be decoded", skipped)
    query = query.valid()
    gallery = gallery.valid() if gallery else None
    dims = slice(None) if args.num_feat is None else slice(0, args.num_feat)
    metrics = retrieval_metrics(
        query.features[:, dims], query.labels,
        gallery.features[:, dims] if gallery else None, gallery.labels if gallery else None,
        ks=data.ks, chunk_size=args.chunk_size,
    )
    metrics.update(
        skipped_images=skipped,
        images_per_second=num_images / max(seconds_embed, 1e-9),
        seconds=time.perf_counter() - start,
    )
    return Evaluation(metrics, query, gallery)


def evaluate(model, data: RetrievalDataset, args, device: torch.device, precision: str) -> dict:
    """The metrics of :func:`run_evaluation` (for the training loops' per-epoch evaluation)."""
    return run_evaluation(model, data, args, device, precision).metrics


def report(result: dict, data: RetrievalDataset, args) -> dict:
    """The results.json record (percentages) and a printed table."""
    record = {
        "dataset": data.name,
        "model": str(args.model_name),
        "num_query": result["num_query"],
        "num_gallery": result["num_gallery"],
        "world_size": dist.get_world_size(),
        "num_feat": args.num_feat,  # None: every embedding dimension
        "recall": {str(k): 100.0 * v for k, v in result["recall"].items()},
        "map_at_r": 100.0 * result["map_at_r"],
        "r_precision": 100.0 * result["r_precision"],
        "num_lone_queries": result["num_lone_queries"],
        "skipped_images": result["skipped_images"],
        "images_per_second": result["images_per_second"],
        "seconds": result["seconds"],
    }
    lines = [f"{data.name}  {args.model_name}  queries={record['num_query']} gallery={record['num_gallery']}"]
    lines += [f"  Recall@{k:<5} {v:6.2f}" for k, v in record["recall"].items()]
    lines += [f"  MAP@R        {record['map_at_r']:6.2f}", f"  R-precision  {record['r_precision']:6.2f}"]
    print("\n".join(lines), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = dist.setup(args.device)
    setup_logging()
    try:
        if not args.eval:
            if args.published:
                _compare_with_published(args)
            if args.compile:
                raise ValueError("--compile applies to --eval (embedding with a frozen model); fine-tuning runs "
                                 "eagerly")
            return train(args, device)
        torch.manual_seed(args.seed)
        model, transform = load(args.model_name, device=device, compile=args.compile)
        size = getattr(model, "_orig_mod", model).config.embedding_size
        if args.num_feat is not None and args.num_feat > size:
            raise ValueError(f"--num_feat {args.num_feat} is larger than the model's embedding ({size})")
        data = load_retrieval_dataset(args.dataset, args.data_root, "test", transform, args.skip_bad_images)
        damaged = check_images([data.query, data.gallery], args.strict_images)
        precision = resolve_precision(args.precision, device)
        evaluation = run_evaluation(model, data, args, device, precision)
        if dist.is_main_process():
            record = {**report(evaluation.metrics, data, args), **damaged, **runtime_record(args, device)}
            write_json(record, Path(args.output) / "results.json")
            if args.visualize:
                from ..visualize import retrieval_grid

                path = Path(args.output) / "retrieval_examples.png"
                retrieval_grid(evaluation.query, evaluation.gallery, data, args.visualize, path,
                               seed=args.seed, num_feat=args.num_feat)
                logger.info("wrote %s", path)
        dist.barrier()
        return 0
    finally:
        dist.cleanup()
