"""`unicom serve` under load: requests per second and p50/p99 latency, with and without query batching.

A collection of synthetic photos is embedded with a model of the chosen architecture (random
weights: the speed is the same, and nothing is downloaded), then served twice by the real command
on 127.0.0.1: with ``--max-batch 1`` (each query its own model call, one after another: the peer)
and with ``--max-batch N`` (queries that wait together run as one model call): both servers run
at once and take turns (``--rounds``), so that other jobs on the machine weigh on both alike.
``--clients`` concurrent clients send image uploads, then ``{"id": N}`` searches, each run
bounded by ``--requests`` (``--id-requests``) and ``--seconds``. Every request must succeed
(status 200 and ``k`` results), or the script fails.

Run from the repository root:
    python -m benchmarks.bench_serve                            # ViT-B/32, 8 clients
    python -m benchmarks.bench_serve --clients 16 --requests 256 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32", help="architecture (random weights)")
    parser.add_argument("--images", type=int, default=64, help="photos in the collection")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=48, help="image requests per run (at most)")
    parser.add_argument("--id-requests", type=int, default=512, help="id requests per run (at most)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each server, in turns")
    parser.add_argument("--seconds", type=float, default=90, help="seconds per run (at most)")
    parser.add_argument("--max-batch", type=int, default=32, help="--max-batch of the batched server")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each server (default 1: the two servers and the clients share the "
                             "machine, and OpenMP threads that wait on each other's time slices slow everything)")
    parser.add_argument("--work-dir", default=None, help="keep the collection here (default: a temporary folder)")
    return parser


def build_collection(work: Path, args) -> tuple[Path, list[Path]]:
    """(collection folder, query photos): photos of 500x375, embedded with a random-weight model."""
    import torch

    import unicom
    from benchmarks.bench_throughput import write_photos
    from unicom.checkpoint import save_model
    from unicom.collection.embed import embed_collection

    images, queries = work / "images", work / "queries"
    images.mkdir(parents=True, exist_ok=True)
    queries.mkdir(exist_ok=True)
    write_photos(images, args.images, (500, 375), workers=1, seed=0)
    query_paths = [Path(p) for p in write_photos(queries, 16, (500, 375), workers=1, seed=10_000)]
    checkpoint = work / "model.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        save_model(unicom.create_model(args.model), checkpoint)
    collection = work / "col"
    embed_collection([str(images)], collection, str(checkpoint), batch_size=32, num_workers=0, device=args.device,
                     decode="exact")
    return collection, query_paths


class Server:
    """`python -m unicom serve` on 127.0.0.1 on a free port, as a subprocess."""

    def __init__(self, collection: Path, max_batch: int, device: str, threads: int, log: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = open(log, "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "unicom", "serve", str(collection), "--host", "127.0.0.1", "--port",
             str(self.port), "--max-batch", str(max_batch), "--device", device],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start in time")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


async def load(url: str, make_request, clients: int, requests: int, seconds: float, k: int) -> dict:
    """Send up to ``requests`` requests from ``clients`` concurrent clients for at most ``seconds``."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    issued = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            number = issued
            issued += 1
            started = time.perf_counter()
            try:
                response = await http.post("/search", **make_request(number))
                body = response.json()
                if response.status_code != 200 or len(body["results"]) != k:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                failures.append(repr(error))
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "failures": failures, "seconds": elapsed, "latencies": np.array(latencies)}


def service_counters(url: str) -> tuple[int, int]:
    import httpx

    service = httpx.get(url + "/info", timeout=30).json()["service"]
    return service["batches"], service["queries"]


def measure(collection: Path, queries: list[Path], servers: dict[str, int], args, work: Path) -> dict:
    """{kind: {server label: load result}}: image then id searches, the servers taking turns
    (``--rounds`` runs each) so that a load from other jobs that comes and goes hits them alike."""
    ids = list(range(args.images))
    photos = [q.read_bytes() for q in queries]
    kinds = {
        "image": lambda n: {"files": {"image": ("q.jpg", photos[n % len(photos)], "image/jpeg")},
                            "data": {"k": str(args.k)}},
        "id": lambda n: {"json": {"id": ids[random.Random(n).randrange(len(ids))], "k": args.k}},
    }
    running = {label: Server(collection, max_batch, args.device, args.threads, work / f"serve-{max_batch}.log")
               for label, max_batch in servers.items()}
    try:
        for server in running.values():
            server.wait()
        out = {}
        for kind, make_request in kinds.items():
            for server in running.values():  # warm-up
                asyncio.run(load(server.url, make_request, args.clients, 2 * args.clients, args.seconds, args.k))
            runs = {label: [] for label in running}
            for _ in range(args.rounds):
                for label, server in running.items():
                    before = service_counters(server.url)
                    count = args.requests if kind == "image" else args.id_requests
                    result = asyncio.run(load(server.url, make_request, args.clients, count, args.seconds, args.k))
                    after = service_counters(server.url)
                    result["batches"] = after[0] - before[0]
                    runs[label].append(result)
            out[kind] = {label: pooled(results) for label, results in runs.items()}
        return out
    finally:
        for server in running.values():
            server.stop()


def pooled(results: list[dict]) -> dict:
    """The rounds of one server together: requests over total time, percentiles over all latencies."""
    ms = np.concatenate([r["latencies"] for r in results]) * 1000
    requests = sum(r["requests"] for r in results)
    return {"requests": requests, "rps": requests / sum(r["seconds"] for r in results),
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean_batch": requests / max(1, sum(r["batches"] for r in results)),
            "failures": [f for r in results for f in r["failures"]]}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        print(f"building a collection of {args.images} photos with {args.model} (random weights) ...", flush=True)
        collection, queries = build_collection(work, args)
        servers = {"one at a time": 1, f"batched (max {args.max_batch})": args.max_batch}
        print(f"serving it {', '.join(servers)}, in turns ...", flush=True)
        by_kind = measure(collection, queries, servers, args, work)
    print(f"\n{args.model} on {args.device} ({args.threads} threads per server), {args.clients} clients, k={args.k}, "
          f"loopback, {args.rounds} rounds per server of up to {args.requests} image or {args.id_requests} id "
          f"requests, or {args.seconds:g} s")
    print(f"{'query':<6} {'server':<20} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}")
    failed = 0
    for kind, runs in by_kind.items():
        for label, r in runs.items():
            failed += len(r["failures"])
            print(f"{kind:<6} {label:<20} {r['requests']:>8} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
                  f"{r['mean_batch']:>6.1f}")
        base, batched = runs.values()
        print(f"{kind:<6} batched / one at a time: {batched['rps'] / base['rps']:.2f}x req/s, "
              f"p50 {batched['p50'] / base['p50']:.2f}x, p99 {batched['p99'] / base['p99']:.2f}x")
        for label, r in runs.items():
            for failure in r["failures"][:5]:
                print(f"FAILED ({kind}, {label}): {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
