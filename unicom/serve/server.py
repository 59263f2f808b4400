"""Running the service on uvicorn: one process, or ``workers`` processes sharing the port."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from dataclasses import asdict

from .app import ServeOptions, create_app

__all__ = ["is_loopback", "serve"]

logger = logging.getLogger(__name__)

_CONFIG_VARIABLE = "UNICOM_SERVE_CONFIG"  # how the parent hands the configuration to worker processes


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def build_app(collection: str, options: ServeOptions, device: str | None = None, duplicates: str | None = None):
    """Open the collection, load its model (so a broken one fails now, not at the first query)
    and build the application."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bar per batch of queries in the server's log
    from .backend import CollectionBackend

    backend = CollectionBackend.open(collection, device=device, duplicates=duplicates)
    backend.warm_up()
    return create_app(backend, options)


def app_from_environment():
    """The application of one worker process (``uvicorn --factory``), configured by the parent."""
    config = json.loads(os.environ[_CONFIG_VARIABLE])
    if config["threads"]:  # workers share the cores rather than each spinning up one thread per core
        import torch

        torch.set_num_threads(config["threads"])
    return build_app(config["collection"], ServeOptions(**config["options"]), config["device"], config["duplicates"])


def serve(collection: str, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          options: ServeOptions | None = None, device: str | None = None, duplicates: str | None = None,
          log_level: str = "info") -> None:
    """Serve ``collection`` until interrupted (Ctrl+C)."""
    import uvicorn

    options = options or ServeOptions()
    if not is_loopback(host) and not options.token:
        message = (f"warning: serving on {host} without --token: anyone who can reach this machine on port {port} "
                   "can search the collection and read its images")
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)
    if workers == 1:
        app = build_app(collection, options, device, duplicates)
        logger.info("serving %s on http://%s:%d/", collection, host, port)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    from .backend import CollectionBackend

    CollectionBackend.open(collection, duplicates=duplicates)  # a bad folder fails here, once, not in every worker
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ[_CONFIG_VARIABLE] = json.dumps({"collection": os.path.abspath(collection), "options": asdict(options),
                                               "device": device, "duplicates": duplicates, "threads": threads})
    logger.info("serving %s on http://%s:%d/ with %d worker processes", collection, host, port, workers)
    uvicorn.run("unicom.serve.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)
