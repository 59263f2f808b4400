"""Embed every image(-text) sample for clustering: step 1 of cluster discrimination pretraining.

    python extract_features.py --source clip --clip-model ViT-B-32 --clip-pretrained laion400m_e32 \\
        --inputs 'laion/{00000..00099}.tar' --output features/
    torchrun --nproc_per_node 8 extract_features.py --source clip --inputs 'laion/*.tar' --output features/
    python extract_features.py --source pixels --inputs images/ --output features/

Writes per input shard features_<shard>.npy (float16, L2-normalised), keys_<shard>.txt and
meta_<shard>.json, then manifest.json. Rerun the same command to finish an interrupted run:
finished shards are kept. Undecodable images are skipped and counted.
"""

from __future__ import annotations

import argparse
import logging

# Only the flags at import: --help and usage errors answer before torch loads (see .flags).
from .flags import (add_loader_args, FEATURE_SOURCES, FUSIONS, PRECISION_CHOICES, device_option,
                    output_dir, parse, positive_int, program_parser)

logger = logging.getLogger("unicom.extract_features")

# Which command-line option feeds which keyword of each source's builder.
SOURCE_OPTIONS = {
    "clip": {"model_name": "clip_model", "pretrained": "clip_pretrained"},
    "unicom": {"model_name": "model_name"},
    "pixels": {"size": "pixel_size"},
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = program_parser("extract_features", __doc__, add_help)
    p.add_argument("--source", default="clip", choices=FEATURE_SOURCES, help="feature source")
    p.add_argument("--inputs", nargs="+", required=True,
                   help="tar shards (paths, 'shard-{000..009}.tar' patterns, globs) or one folder of images")
    p.add_argument("--output", required=True, type=output_dir, help="output folder (shared by all processes)")
    p.add_argument("--fusion", default=None, choices=FUSIONS,
                   help="clip: mean of image and caption features (default), image or text alone")
    p.add_argument("--clip-model", "--clip_model", dest="clip_model", default="ViT-B-32",
                   help="open_clip model name")
    p.add_argument("--clip-pretrained", "--clip_pretrained", dest="clip_pretrained", default="laion400m_e32",
                   help="open_clip pretrained tag or weights file; 'none' for random weights")
    p.add_argument("--model-name", "--model_name", dest="model_name", default="ViT-B/32",
                   help="unicom source: a registered model name or a checkpoint path")
    p.add_argument("--pixel-size", "--pixel_size", dest="pixel_size", type=positive_int, default=16,
                   help="pixels source: images are resized to this square size (feature size 3*s*s)")
    add_loader_args(p, 256, "images per forward pass", "decoding processes per process (each reads whole shards)")
    p.add_argument("--folder-shard-size", "--folder_shard_size", dest="folder_shard_size", type=int, default=10_000,
                   help="folder input: images per virtual shard (the unit of resuming)")
    p.add_argument("--device", default=None, type=device_option,
                   help="cuda, cuda:1 or cpu (default: the local GPU when there is one, else the CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="autocast precision of the forward pass; auto = fp16 on GPUs, fp32 on CPUs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse(get_args_parser(), argv)
    from .. import _distributed as dist
    from .._pretrain.features import build_source, extract_features
    from .common import resolve_precision, process_group

    with process_group(args.device) as device:
        options = {key: getattr(args, arg) for key, arg in SOURCE_OPTIONS[args.source].items()}
        if "pretrained" in options and str(options["pretrained"]).lower() in ("none", ""):
            options["pretrained"] = None
        source = build_source(args.source, device=device, **options)
        manifest = extract_features(
            source, args.inputs, args.output, args.batch_size, fusion=args.fusion,
            precision=resolve_precision(args.precision, device), num_workers=args.num_workers,
            folder_shard_size=args.folder_shard_size,
        )
        if dist.is_main_process():
            print(f"{manifest['num_samples']} samples, {len(manifest['shards'])} shards, "
                  f"{manifest['num_bad']} undecodable skipped, {manifest['num_without_caption']} without caption "
                  f"-> {args.output}", flush=True)
        return 0
