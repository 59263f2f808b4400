"""The ``unicom`` command: ``unicom embed | index | search | dedup`` (see ``unicom COMMAND --help``).

Each subcommand parses its flags and calls one library function of :mod:`unicom.collection`;
bad input ends with a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from .serve.cli import add_serve_parser, run_serve
# Only the torch-free flags at import: `unicom --help` and usage errors answer at once.
from .programs.flags import (EMBEDDING_PRECISION_CHOICES, _decode_option, device_option, fraction, non_negative_int,
                             positive_int, run_cli)

__all__ = ["get_args_parser", "main", "run"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def memory_size(value: str) -> int:
    """--memory: bytes, e.g. 4GB, 512MB, 1.5G."""
    match = _SIZE.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {value!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "BKMGT".index(unit or "B")) if unit else int(number)


def threshold(value: str) -> float | str:
    """--threshold: auto, or a cosine similarity in (-1, 1]."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not -1 < number <= 1:
        raise argparse.ArgumentTypeError(f"expected auto or a cosine similarity in (-1, 1], got {value!r}")
    return number


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("unicom", description="Embed, index, search and deduplicate your own images.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed images into a collection (incremental, resumable, torchrun)")
    embed.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="folders, webdataset .tar files, brace/glob patterns, or text files listing paths")
    embed.add_argument("--output", "-o", required=True, metavar="COL", help="the collection folder")
    embed.add_argument("--model", default="ViT-B/32", help="a model name or a checkpoint path (default ViT-B/32)")
    embed.add_argument("--batch-size", "--batch_size", dest="batch_size", type=positive_int, default=128)
    embed.add_argument("--num-workers", "--num_workers", dest="num_workers", type=non_negative_int, default=4)
    embed.add_argument("--device", default=None, type=device_option, help="cuda, cuda:1 or cpu")
    embed.add_argument("--precision", default="auto", choices=EMBEDDING_PRECISION_CHOICES,
                       help="auto (fp16 autocast on GPUs, fp32 on CPUs), fp32, fp16, bf16, or int8 (CPUs only: "
                            "several times faster, close to fp32 but not the published numbers)")
    embed.add_argument("--decode", default="auto", type=_decode_option, help="input pipeline (as retrieval.py)")
    embed.add_argument("--part-size", dest="part_size", type=positive_int, default=10_000,
                       help="images per part file (the unit a killed run resumes from)")

    index = commands.add_parser("index", help="build or update the faiss index of a collection")
    index.add_argument("collection", metavar="COL")
    index.add_argument("--kind", default="auto", choices=("auto", "flat", "hnsw", "ivf", "ivfpq"))
    index.add_argument("--memory", type=memory_size, default=memory_size("4GB"), help="memory budget (default 4GB)")
    index.add_argument("--recall", type=fraction, default=0.95, help="recall@k to reach (default 0.95)")
    index.add_argument("--k", type=positive_int, default=10)
    index.add_argument("--rebuild", action="store_true", help="train again instead of updating the index")

    search = commands.add_parser("search", help="search a collection with images, folders or id:N")
    search.add_argument("collection", metavar="COL")
    search.add_argument("queries", nargs="+", metavar="QUERY", help="an image file, a folder of images, or id:N")
    search.add_argument("-k", type=positive_int, default=10)
    search.add_argument("--json", action="store_true", help="one JSON object per query per line")
    search.add_argument("--device", default=None, type=device_option)

    dedup = commands.add_parser("dedup", help="find exact and near duplicates in a collection")
    dedup.add_argument("collection", metavar="COL")
    dedup.add_argument("--threshold", type=threshold, default="auto",
                       help="auto (calibrated on the collection) or a cosine similarity")
    dedup.add_argument("--output", default=None, help="the Parquet file to write (default COL/dups.parquet)")
    dedup.add_argument("--device", default=None, type=device_option)
    add_serve_parser(commands)
    return parser


def _embed(args) -> int:
    from . import _distributed as dist
    from .collection.embed import embed_collection
    from .programs.common import process_group, resolve_precision

    with process_group(args.device) as device:
        summary = embed_collection(args.sources, args.output, args.model, batch_size=args.batch_size,
                                   num_workers=args.num_workers, device=device,
                                   precision=resolve_precision(args.precision, device), decode=args.decode,
                                   part_size=args.part_size)
        if dist.is_main_process():  # while the process group still says which rank this is
            print("\n".join(summary.lines()), flush=True)
    return 0


def _queries(collection, queries: list[str]) -> list[tuple[str, object]]:
    """(label, query) pairs: an id (int) for ``id:N``, else an image path."""
    import os

    from .collection.sources import list_sources

    out: list[tuple[str, object]] = []
    for query in queries:
        if query.startswith("id:"):
            try:
                out.append((query, int(query[3:])))
            except ValueError:
                raise ValueError(f"expected id:N with a whole number N, got {query!r}") from None
        elif os.path.isdir(query):
            out += [(item.path, item.path) for item in list_sources([query]).items]
        elif os.path.isfile(query):
            out.append((query, query))
        else:
            raise FileNotFoundError(f"query {query!r} not found: expected an image file, a folder, or id:N")
    return out


def _search(args) -> int:
    from .collection import Collection

    collection = Collection.open(args.collection, device=args.device)
    queries = _queries(collection, args.queries)
    ids = [q for _, q in queries if isinstance(q, int)]
    images = [q for _, q in queries if not isinstance(q, int)]
    by_id = dict(zip(ids, collection.search_ids(ids, args.k))) if ids else {}
    by_image = dict(zip(images, collection.search(images, args.k))) if images else {}
    for label, query in queries:
        results = by_id[query] if isinstance(query, int) else by_image[query]
        if args.json:
            print(json.dumps({"query": label, "results": results}), flush=True)
            continue
        print(f"query: {label}")
        print(f"{'rank':>4}  {'score':>6}  path")
        for rank, result in enumerate(results, 1):
            print(f"{rank:>4}  {result['score']:6.3f}  {result['image_path']}")
    return 0


def _index(args) -> int:
    from .collection import Collection
    from .collection.index import build_index
    from .programs.common import setup_logging

    setup_logging()
    record = build_index(Collection.open(args.collection), kind=args.kind, memory=args.memory, recall=args.recall,
                         k=args.k, rebuild=args.rebuild)
    print(json.dumps(record, indent=2), flush=True)
    return 0


def _dedup(args) -> int:
    from .collection.dedup import dedup_collection
    from .programs.common import setup_logging

    setup_logging()
    report = dedup_collection(args.collection, threshold=args.threshold, output=args.output, device=args.device)
    print("\n".join(report.lines()), flush=True)
    return 0


_COMMANDS = {"embed": _embed, "search": _search, "index": _index, "dedup": _dedup, "serve": run_serve}


def run(argv: list[str] | None = None) -> int:
    """Run ``unicom COMMAND ...`` and return the exit status; errors raise (for callers and tests)."""
    import logging

    args = get_args_parser().parse_args(argv)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loaded, at INFO
    return _COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """The console script: errors that describe bad input end with one line and exit status 2."""
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
