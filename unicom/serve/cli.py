"""The ``serve`` subcommand of ``unicom``: ``unicom serve COL [--host] [--port] [--workers] [--token]``."""

from __future__ import annotations

import argparse
import math
import os

__all__ = ["add_serve_parser", "run_serve"]

TOKEN_VARIABLE = "UNICOM_SERVE_TOKEN"


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {value!r}")
    return int(value)


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def _megabytes(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of megabytes, got {value!r}")
    return number


def add_serve_parser(commands) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``unicom`` command's subparsers."""
    from ..programs.flags import device_option

    serve = commands.add_parser(
        "serve", help="serve a search service and a web page over a collection",
        description="Serve COL read-only: a JSON search API and a page at http://HOST:PORT/ to drop an image, "
                    "browse results and review duplicate clusters.")
    serve.add_argument("collection", metavar="COL")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 needs --token)")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--workers", type=_count, default=1, help="server processes, each with its own model")
    serve.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE) or None,
                       help=f"require 'Authorization: Bearer TOKEN' on every endpoint but /health "
                            f"(default: ${TOKEN_VARIABLE}, which keeps it out of the process list)")
    serve.add_argument("--max-upload-mb", dest="max_upload_mb", type=_megabytes, default=20.0,
                       help="largest request body accepted (default 20)")
    serve.add_argument("--max-k", dest="max_k", type=_count, default=1000, help="most results one search returns")
    serve.add_argument("--max-batch", dest="max_batch", type=_count, default=32,
                       help="most queries run by one model call (1: no batching)")
    serve.add_argument("--duplicates", default=None, help="the dedup output to show (default COL/dups.parquet)")
    serve.add_argument("--device", default=None, type=device_option,
                       help="where query images are embedded (default: CUDA if present)")
    return serve


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit status."""
    from ..programs.common import setup_logging
    from .app import ServeOptions
    from .server import serve

    setup_logging()
    options = ServeOptions(token=args.token, max_upload_mb=args.max_upload_mb, max_k=args.max_k,
                           batching=args.max_batch > 1, max_batch=args.max_batch)
    serve(args.collection, host=args.host, port=args.port, workers=args.workers, options=options,
          device=args.device, duplicates=args.duplicates)
    return 0
