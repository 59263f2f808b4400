"""Zero-shot retrieval evaluation (``--eval``) and supervised fine-tuning on a retrieval benchmark.

    torchrun --nproc_per_node 8 retrieval.py --eval --dataset cub --model_name ViT-B/32
    python retrieval.py --eval --dataset digits --model_name ViT-B/32
    python retrieval.py --dataset sop --model_name ViT-B/32 --published --output runs/sop

Fine-tuning (without ``--eval``): margin softmax with Partial FC on the train split, the
test split evaluated after each epoch, checkpoints from which ``--resume auto`` continues a
killed run exactly (see unicom/_training.py, which holds the loop).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

# Only the flags at import: --help and usage errors answer before torch loads (see .flags);
# each function below imports what it uses.
from .flags import (add_loader_args, DATASET_NAMES, add_runtime_args, add_train_args, non_empty,
                    non_negative_int, output_dir, parse, positive_int, program_parser, seed)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("unicom.retrieval")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = program_parser("retrieval", __doc__, add_help)
    p.add_argument("--eval", action="store_true", help="zero-shot evaluation only (no fine-tuning)")
    p.add_argument("--published", action="store_true",
                   help="fine-tuning: start from the published script's settings for --dataset and --model_name "
                        "(batch per process, epochs, lr, margins, num_feat, transform, ...); flags given here win")
    p.add_argument("--dataset", default="cub", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-root", "--data_root", dest="data_root", default="data",
                   help="the folder that holds each dataset's own folder in its standard layout "
                        "(<root>/CUB_200_2011/images/..., <root>/Stanford_Online_Products/...); for --dataset folder, "
                        "the folder of labelled images itself")
    p.add_argument("--model_name", "--model-name", dest="model_name", default="ViT-B/16", type=non_empty,
                   help="a registered model name or a checkpoint path (default: %(default)s, as published)")
    add_loader_args(p, 128, "images per process per step", "data loading processes per process")
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


# The published fine-tuning scripts, as data: (dataset, model) -> processes x batch per process,
# epochs, peak lr, ArcFace margin m2, embedding size, augmentation. Every one of them also uses
# the settings in PUBLISHED_COMMON. ``retrieval.py --published`` starts from these.
_RUN_FIELDS = ("processes", "batch_size", "epochs", "lr", "margin_loss_m2", "output_dim", "transform")
PUBLISHED_RUNS = {(dataset, model): dict(zip(_RUN_FIELDS, row)) for dataset, model, *row in [
    ("sop", "ViT-B/32", 1, 64, 64, 1e-5, 0.25, 512, "origin_clip"),
    ("sop", "ViT-B/16", 1, 64, 64, 1e-5, 0.25, 768, "origin_clip"),
    ("sop", "ViT-L/14", 4, 16, 64, 1e-5, 0.3, 768, "origin_clip"),
    ("sop", "ViT-L/14@336px", 8, 16, 64, 1e-5, 0.25, 768, "origin_clip"),
    ("inshop", "ViT-B/16", 4, 16, 128, 1e-5, 0.25, 768, "timm"),
    ("inshop", "ViT-L/14", 4, 16, 128, 1e-5, 0.25, 768, "timm"),
    ("inshop", "ViT-L/14@336px", 8, 16, 128, 1e-5, 0.25, 768, "timm"),
    ("inat", "ViT-B/16", 8, 128, 128, 4e-5, 0.35, 768, "timm"),
    ("inat", "ViT-L/14", 8, 64, 64, 1e-5, 0.35, 768, "timm"),
]}
PUBLISHED_COMMON = dict(margin_loss_s=32.0, margin_loss_m1=1.0, margin_loss_m3=0.0, num_feat=512, sample_rate=1.0,
                        lr_pfc_weight=10.0, optimizer="adamw", weight_decay=0.0, gradient_acc=1, seed=1024)


def published_settings(dataset: str, model_name: str) -> dict:
    """The flags of the published fine-tuning script for ``dataset`` and ``model_name`` (without
    ``processes``, the number of GPUs it ran on); a ValueError names the runs that exist."""
    run = PUBLISHED_RUNS.get((dataset, model_name))
    if run is None:
        runs = ", ".join(f"{d} {m}" for d, m in PUBLISHED_RUNS)
        raise ValueError(f"no published fine-tuning run for --dataset {dataset} --model_name {model_name}; "
                         f"published: {runs}")
    return {**PUBLISHED_COMMON, **{k: v for k, v in run.items() if k != "processes"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with ``--published``, the published run's settings fill in every flag not given."""
    parser = get_args_parser()
    args = parse(parser, argv)
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
    from .. import _distributed as dist

    run = PUBLISHED_RUNS[(args.dataset, args.model_name)]
    processes, published = run["processes"], run["processes"] * run["batch_size"]
    world = dist.get_world_size()
    if world * args.batch_size != published:
        logger.warning("the published run used %d process(es) x %d images (%d per step); this one %d x %d (%d): "
                       "results may differ from the published numbers", processes, published // processes,
                       published, world, args.batch_size, world * args.batch_size)


def _evaluate(model, data, args, device, heading: str = "") -> tuple[dict, object]:
    """Evaluate ``model`` on ``data``: (the results.json record, the :class:`RetrievalResult`); the
    table printed starts with ``heading`` (fine-tuning: the epoch)."""
    from .. import _distributed as dist
    from ..evaluate import evaluate_retrieval
    from .common import embedding_options, print_retrieval

    result = evaluate_retrieval(model, data.query, data.gallery, ks=data.ks, num_feat=args.num_feat,
                                chunk_size=args.chunk_size, **embedding_options(args, device))
    record = {"dataset": data.name, "model": str(args.model_name), **result.record()}
    if dist.is_main_process():
        print_retrieval(record, heading)
    return record, result


def evaluate(args, device: torch.device) -> int:
    """``--eval``: zero-shot retrieval of ``--model_name`` on ``--dataset``'s test split."""
    import torch

    from .. import _distributed as dist
    from .._utils import unwrap_model, write_json
    from ..data import load_retrieval_dataset
    from .common import check_images, load_for_embedding, runtime_record

    torch.manual_seed(args.seed)
    model, transform = load_for_embedding(args.model_name, device, args.precision, compile=args.compile)
    size = unwrap_model(model).config.embedding_size
    if args.num_feat is not None and args.num_feat > size:
        raise ValueError(f"--num_feat {args.num_feat} is larger than the model's embedding ({size})")
    data = load_retrieval_dataset(args.dataset, args.data_root, "test", transform, args.skip_bad_images)
    damaged = check_images([data.query, data.gallery], args.strict_images)
    record, result = _evaluate(model, data, args, device)
    if dist.is_main_process():
        write_json({**record, **damaged, **runtime_record(args, device)}, Path(args.output) / "results.json")
        if args.visualize:
            from .._visualize import retrieval_grid

            path = Path(args.output) / "retrieval_examples.png"
            retrieval_grid(result.query, result.gallery, data, args.visualize, path, seed=args.seed,
                           num_feat=args.num_feat)
            logger.info("wrote %s", path)
    dist.barrier()
    return 0


# ----------------------------------------------------------------------------- fine-tuning


class EpochSampler:
    """Shuffled per epoch (seed + epoch), split evenly over processes, whole batches only.

    Every process gets the same number of batches (DDP and Partial FC need every process in
    every step); the few images beyond the last whole batch of an epoch are left out of it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        from .. import _distributed as dist

        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.batches_per_epoch = num_items // self.world // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_items} training images are too few for {self.world} process(es) x batch size {batch_size}"
            )

    def batches(self, epoch: int) -> list[list[int]]:
        import torch

        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank :: self.world][:per_rank].tolist()
        return [mine[i : i + self.batch_size] for i in range(0, per_rank, self.batch_size)]


def train_loader(dataset, sampler: EpochSampler, epoch: int, args, pin: bool):
    import torch

    from ..data.loader import collate

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler.batches(epoch), num_workers=args.num_workers, collate_fn=collate,
        pin_memory=pin, persistent_workers=False,
    )


def _decoded(loader):
    """(images, labels) batches; undecodable images (with --skip-bad-images) dropped, never replaced."""
    for images, labels, _, ok in loader:
        yield (images, labels) if bool(ok.all()) else (images[ok], labels[ok])


def train(args, device: torch.device) -> int:
    """Fine-tune ``--model_name`` on ``--dataset``'s train split; evaluate on its test split each epoch."""
    from .. import _distributed as dist
    from .._utils import write_json
    from ..checkpoint import save_model
    from ..data import load_retrieval_dataset
    from .._factory import load
    from .._training import build_trainer, seed_everything, train_epoch
    from .common import check_images, settings, train_transforms, trainer_options

    seed_everything(args.seed)
    model, _ = load(args.model_name, device="cpu")
    config = model.config
    if args.output_dim is not None and args.output_dim != config.embedding_size:
        raise ValueError(f"--output_dim {args.output_dim} differs from the model's embedding size "
                         f"{config.embedding_size}")
    if args.drop_path_rate:
        depth = len(model.blocks)
        for i, block in enumerate(model.blocks):
            block.drop_path.p = args.drop_path_rate * i / max(depth - 1, 1)
    model.set_grad_checkpointing(args.grad_checkpointing)
    tf_train, tf_test = train_transforms(args, config.input_size)
    train_data = load_retrieval_dataset(args.dataset, args.data_root, "train", tf_train, args.skip_bad_images)
    test_data = load_retrieval_dataset(args.dataset, args.data_root, "test", tf_test, args.skip_bad_images)
    damaged = check_images([train_data.query, test_data.query, test_data.gallery], args.strict_images)
    sampler = EpochSampler(len(train_data.query), args.batch_size, args.seed)
    total_steps = args.epochs * math.ceil(sampler.batches_per_epoch / args.gradient_acc)
    trainer = build_trainer(model, num_classes=train_data.num_classes, total_steps=total_steps,
                            **trainer_options(args, device))
    trainer.resume(args.resume)
    output, record, start = Path(args.output), {}, trainer.epoch
    for epoch in range(start, args.epochs):
        loader = train_loader(train_data.query, sampler, epoch, args, pin=device.type == "cuda")
        train_epoch(trainer, _decoded(loader), sampler.batches_per_epoch)
        record, result = _evaluate(trainer.model, test_data, args, device, f"epoch {epoch + 1}/{args.epochs}")
        score = result.metrics["recall"][test_data.ks[0]]
        trainer.best = max(trainer.best, score)
        record.update(epoch=epoch + 1, best_recall_at_1=100.0 * trainer.best)
        if dist.is_main_process():
            save_model(trainer.model, output / "model_last.pt")
            if score >= trainer.best:
                save_model(trainer.model, output / "model_best.pt")
        trainer.finish_epoch()
    if start >= args.epochs:  # resumed a finished run: report it again (every rank embeds)
        record, _ = _evaluate(trainer.model, test_data, args, device, f"epoch {args.epochs}/{args.epochs}")
        record.update(epoch=args.epochs, best_recall_at_1=100.0 * trainer.best)
    if dist.is_main_process():
        write_json({**record, **damaged, "settings": settings(args)}, output / "results.json")
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .._utils import QUANTIZED_PRECISIONS
    from .common import process_group

    with process_group(args.device) as device:
        if args.eval:
            return evaluate(args, device)
        if args.published:
            _compare_with_published(args)
        if args.compile:
            raise ValueError("--compile applies to --eval (embedding with a frozen model); fine-tuning runs eagerly")
        if args.precision in QUANTIZED_PRECISIONS:  # int8: a frozen model on CPUs
            raise ValueError(f"--precision {args.precision} applies to --eval (embedding with a frozen model on "
                             "CPUs); fine-tuning runs in fp32, bf16 or fp16")
        return train(args, device)
