"""Embedding throughput: the model alone, and files on disk to embeddings in memory.

(i) Model alone, random weights, one batch size: ours (``unicom.VisionTransformer`` with
    SDPA) at each ``--precision`` (weights in that dtype, as ``load(precision=...)`` gives),
    eager and ``torch.compile``d, against the published graph (``tests/published_vit.py``,
    same weights, fp16 autocast as published on CUDA, fp32 on the CPU), timm's
    ``vit_base_patch32_clip_224`` and open_clip's ``ViT-B-32`` image tower (random weights, at
    the first ``--precision``). Images/s, ratios against the published graph, and each
    embedding's relative L2 error against the same weights in float64.
(ii) End to end: ``--num-images`` synthetic photographs (crops of scikit-learn's sample
    images with noise, ``--image-size``, JPEG quality 90) in a temporary folder, embedded by
    the published pipeline (float transform in DataLoader workers, no pinned memory, the
    published graph) and by ours with every ``--decode`` option (``unicom.data._pipelines``), the
    model compiled when ``--compile``. Images/s with and without the model, ratios against
    the published pipeline (``--published-workers``, 8 as published; also with ``--workers``),
    and each option's deviation from the exact path: mean absolute pixel difference (0-255)
    and minimum cosine similarity of the embeddings; "exact" says yes for the published
    pixels by construction, "same px" for identical pixels on the images checked. Ours load
    ``--loader-batch`` images per worker batch, through the shared-memory slot ring unless
    ``--slots off`` (``both`` runs each option with and without). ``--loader-only`` (default
    on the CPU) adds the DataLoaders alone against the published one: the workers' side,
    which the device work hides on a CPU.

    python -m benchmarks.bench_throughput                        # a GPU: full sizes
    python -m benchmarks.bench_throughput --model ViT-L/14 --batch 256 --skip-e2e
    python -m benchmarks.bench_throughput --quick --device cpu   # the same ratios, small sizes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import unicom
from unicom import evaluate as embed_module
from unicom.data import ImageDataset, sharded_loader
from unicom.data._pipelines import DECODE_CHOICES, make_pipeline, normalize_on_device, pipeline_loader
from unicom.evaluate import embed_loader
from unicom.transforms import eval_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from published_vit import PublishedViT  # noqa: E402  (the published graph, which the tests check)

# precision -> (weights dtype, autocast dtype): "fp16" is load(precision="fp16"), "amp-fp16" is
# fp32 weights under autocast (the programs' --precision fp16)
PRECISIONS = {
    "fp32": (torch.float32, None),
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
    "amp-fp16": (torch.float32, torch.float16),
    "amp-bf16": (torch.float32, torch.bfloat16),
}
# (timm name, open_clip name) of the same architecture
PEERS = {
    "ViT-B/32": ("vit_base_patch32_clip_224", "ViT-B-32"),
    "ViT-B/16": ("vit_base_patch16_clip_224", "ViT-B-16"),
    "ViT-L/14": ("vit_large_patch14_clip_224", "ViT-L-14"),
    "ViT-L/14@336px": ("vit_large_patch14_clip_336", "ViT-L-14-336"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", default="ViT-B/32", choices=list(PEERS))
    p.add_argument("--batch", type=int, default=None, help="default 512 (GPU), 8 with --quick")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPU count, at most 16)")
    p.add_argument("--published-workers", type=int, default=None,
                   help="workers of the published pipeline, the baseline of the ratios (default 8, as published, "
                        "or --workers if fewer); it also runs with --workers when they differ")
    p.add_argument("--loader-batch", type=int, default=None,
                   help="images per worker batch in our pipelines (default: --batch or 64, whichever is smaller); "
                        "the model still runs on --batch images. The published pipeline loads --batch at once")
    p.add_argument("--slots", choices=("on", "off", "both"), default="on",
                   help="our pipelines' shared-memory slot ring (unicom.data._pipelines.slots): on (default), off, "
                        "or both (each decode option twice)")
    p.add_argument("--num-images", type=int, default=None, help="default 12000, 48 with --quick")
    p.add_argument("--image-size", default="500x375", help="WIDTHxHEIGHT of the synthetic JPEGs")
    p.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=None,
                   help="model precisions to time (fp16/bf16: weights in that dtype; amp-*: fp32 weights under "
                        "autocast); the first is used end to end and for the peers. Default fp16 amp-fp16 bf16 "
                        "fp32 on GPUs, fp32 on the CPU. The accuracy of every precision is always measured")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile (default: on for GPUs, off on the CPU)")
    p.add_argument("--decode", nargs="+", choices=DECODE_CHOICES, default=list(DECODE_CHOICES))
    p.add_argument("--loader-only", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the DataLoaders alone (the workers' side: no copy to the device, no device "
                        "work); default on for the CPU, where the device work competes with the workers")
    p.add_argument("--iters", type=int, default=None, help="timed batches for the model alone (default 30, 2 quick)")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--compile-peers", action="store_true", help="also time the peers compiled (with --compile)")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU check")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.inference_mode()
def time_forward(model, x: torch.Tensor, iters: int, device: torch.device,
                 autocast: torch.dtype | None = None) -> float:
    """Images per second of ``model(x)`` after a few warm-up calls (compilation, clocks)."""
    with _autocast(device, autocast):
        for _ in range(5 if device.type == "cuda" else 1):
            model(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    return iters * x.shape[0] / (time.perf_counter() - start)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@functools.cache
def _sample_images() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def _photo(args: tuple[int, int, int, str]) -> str:
    """One synthetic photograph: a random crop of a sample image, jittered, noised, saved as JPEG."""
    seed, width, height, path = args
    rng = np.random.default_rng(seed)
    source = _sample_images()[seed % 2]  # (427, 640, 3) uint8
    sh, sw = source.shape[:2]
    portrait = rng.random() < 0.25
    w, h = (height, width) if portrait else (width, height)
    scale = rng.uniform(0.35, 1.0)
    ch = int(min(sh, sw * h / w) * scale)
    cw = int(ch * w / h)
    y0, x0 = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    crop = source[y0:y0 + ch, x0:x0 + cw].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)  # contrast and brightness
    image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def write_photos(folder: Path, count: int, size: tuple[int, int], workers: int, seed: int) -> list[str]:
    jobs = [(seed + i, size[0], size[1], str(folder / f"{i:06d}.jpg")) for i in range(count)]
    if workers > 1 and count > 64:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_photo, jobs, chunksize=32)
    return [_photo(j) for j in jobs]


def _peer_models(name: str):
    """(label, module) for timm's and open_clip's image towers of the same size, random weights."""
    timm_name, clip_name = PEERS[name]
    out = []
    try:
        import timm

        out.append((f"timm {timm_name}", timm.create_model(timm_name, pretrained=False, num_classes=0)))
    except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
        print(f"  (timm {timm_name} unavailable: {e})")
    try:
        import open_clip

        out.append((f"open_clip {clip_name}", open_clip.create_model(clip_name, pretrained=None).visual))
    except Exception as e:  # noqa: BLE001
        print(f"  (open_clip {clip_name} unavailable: {e})")
    return out


def _compile(model):
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001
        print(f"  (torch.compile unavailable: {e})")
        return None


def _variants(model, compile: bool) -> list[tuple[bool, torch.nn.Module]]:
    """(compiled?, module): the eager module, and its compiled form when asked and available."""
    compiled = _compile(model) if compile else None
    return [(False, model)] + ([(True, compiled)] if compiled is not None else [])


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    widths = [max(len(title), *(len(fmt.format(r[key])) if r.get(key) is not None else 1 for r in rows))
              for key, title, fmt in columns]
    print("  " + "  ".join(title.rjust(w) if i else title.ljust(w) for i, ((_, title, _), w) in
                           enumerate(zip(columns, widths))))
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in columns]
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))


# ----------------------------------------------------------------------------- (i) the model alone


def bench_model(args, device, model, accuracy_images) -> list[dict]:
    n = model.config.input_size
    x32 = torch.randn(args.batch, 3, n, n, device=device)
    acc = accuracy_images[: args.batch].to(device)  # (k, 3, n, n) real photographs
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(acc.double())
    # The photographs tiled to the timing batch: compiled models see one shape only (eval mode:
    # rows do not depend on each other), and the error is read off the first k rows.
    tiled = acc.repeat(-(-args.batch // acc.shape[0]), 1, 1, 1)[: args.batch]

    @torch.inference_mode()
    def error(m, dtype, amp) -> float:
        with _autocast(device, amp):
            return rel_err(m(tiled.to(dtype))[: acc.shape[0]], reference)

    rows = []
    published = PublishedViT.from_model(model)
    pub_amp = torch.float16 if device.type == "cuda" else None  # the published eval's autocast
    base = time_forward(published, x32, args.iters, device, pub_amp)
    rows.append({"model": "published graph", "precision": "fp16 autocast" if pub_amp else "fp32",
                 "compiled": False, "images_per_s": base, "ratio": 1.0,
                 "rel_err": error(published, torch.float32, pub_amp)})
    del published

    for precision, (dtype, amp) in PRECISIONS.items():
        ours = copy.deepcopy(model).to(dtype).eval()
        if precision not in args.precision:
            rows.append({"model": "ours (SDPA)", "precision": precision, "compiled": False,
                         "rel_err": error(ours, dtype, amp)})
            continue
        variants = _variants(ours, args.compile)
        for compiled_flag, m in variants:
            try:
                speed = time_forward(m, x32.to(dtype), args.iters, device, amp)
                err = error(m, dtype, amp)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor
                print(f"  ours {precision} compiled={compiled_flag} failed: {type(e).__name__}: {e}")
                continue
            rows.append({"model": "ours (SDPA)", "precision": precision, "compiled": compiled_flag,
                         "images_per_s": speed, "ratio": speed / base, "rel_err": err})
        del ours, variants

    if not args.skip_peers:
        precision = args.precision[0]
        dtype, amp = PRECISIONS[precision]
        for label, peer in _peer_models(args.model):
            peer = peer.to(device=device, dtype=dtype).eval()
            variants = _variants(peer, args.compile and args.compile_peers)
            for compiled_flag, m in variants:
                try:
                    speed = time_forward(m, x32.to(dtype), args.iters, device, amp)
                except Exception as e:  # noqa: BLE001
                    print(f"  {label} failed: {type(e).__name__}: {e}")
                    continue
                rows.append({"model": label, "precision": precision, "compiled": compiled_flag,
                             "images_per_s": speed, "ratio": speed / base, "rel_err": None})
            del peer, variants
    print(f"\n(i) model alone: {args.model}, batch {args.batch}, {device}; rel_err = |e - e64| / |e64| "
          f"over {acc.shape[0]} real images")
    _table(rows, [("model", "model", "{}"), ("precision", "precision", "{}"), ("compiled", "compiled", "{}"),
                  ("images_per_s", "images/s", "{:,.1f}"), ("ratio", "vs published", "{:.2f}x"),
                  ("rel_err", "rel err vs fp64", "{:.2e}")])
    return rows


# ----------------------------------------------------------------------------- (ii) end to end


def _passes(dataset) -> int:
    """Passes over the files for the input-only rate: at least 512 images, for a stable figure."""
    return max(1, -(-512 // len(dataset)))


@torch.inference_mode()
def run_published(dataset, args, device, model, workers: int) -> tuple[float, float, float | None, torch.Tensor]:
    """(images/s end to end, input only, loader only (None unless ``--loader-only``), embeddings):
    the published evaluation loop.

    Input only: the loader and the copy to the device, no model (over at least 512 images).
    Loader only: the DataLoader's batches alone (the workers' side).
    """
    amp = torch.float16 if device.type == "cuda" else None

    def loader():
        return sharded_loader(dataset, args.batch, workers, pin_memory=False)

    start = time.perf_counter()
    for _ in range(_passes(dataset)):
        for images, *_ in loader():
            images.to(device)
    _sync(device)
    input_only = _passes(dataset) * len(dataset) / (time.perf_counter() - start)
    loader_only = _loader_rate(loader) if args.loader_only else None
    out = []
    start = time.perf_counter()
    with _autocast(device, amp):
        for images, *_ in loader():
            out.append(model(images.to(device)).float())
    _sync(device)
    return len(dataset) / (time.perf_counter() - start), input_only, loader_only, torch.cat(out)


@torch.inference_mode()
def run_ours(dataset, pipeline, args, device, model, amp, use_slots=None):
    """(images/s end to end, input only, loader only, embeddings) with ``pipeline`` and ``embed_loader``."""

    def loader():
        return pipeline_loader(dataset, pipeline, args.loader_batch, args.workers, device, use_slots=use_slots)

    start = time.perf_counter()
    for _ in range(_passes(dataset)):
        for images, _, _, ok in loader():
            pipeline.to_device(images, ok, device)
    _sync(device)
    input_only = _passes(dataset) * len(dataset) / (time.perf_counter() - start)
    loader_only = _loader_rate(loader) if args.loader_only else None
    start = time.perf_counter()
    loader = pipeline_loader(dataset, pipeline, args.loader_batch, args.workers, device, use_slots=use_slots)
    precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp]  # autocast_for's names
    result = embed_loader(model, loader, device, precision, desc=pipeline.decode, preprocess=pipeline.to_device,
                          batch_size=args.batch)
    _sync(device)
    return len(dataset) / (time.perf_counter() - start), input_only, loader_only, result.features


def _loader_rate(make_loader) -> float:
    """Images/s of a fresh loader's batches alone, over at least 512 images (nothing is done with
    them: slots are rewritten unread, which only the consumer could notice)."""
    count, start = 0, time.perf_counter()
    for _ in range(_passes(make_loader().dataset)):
        for batch in make_loader():
            count += len(batch[0])
    return count / (time.perf_counter() - start)


def pixels_of(dataset, pipeline, count: int, args, device) -> torch.Tensor:
    """uint8 (count, 3, n, n) crops of the first ``count`` images as ``pipeline`` delivers them."""
    subset = ImageDataset(dataset.samples[:count], dataset.labels[:count], dataset.transform)
    out = []
    loader = pipeline_loader(subset, pipeline, args.batch, min(args.workers, 2), device, normalize_in_workers=False)
    for images, *_ in loader:
        out.append(pipeline.pixels(images, device))
    return torch.cat(out)


@torch.inference_mode()
def warm_up(model, n: int, sizes: set[int], device, dtype, amp=None) -> None:
    """Compile (and tune) for every batch size the runs will see, outside the timed region."""
    with _autocast(device, amp):
        for b in sorted(sizes):
            if b:
                model(torch.zeros(b, 3, n, n, device=device, dtype=dtype))
    _sync(device)


def bench_e2e(args, device, model, folder: Path) -> list[dict]:
    n = model.config.input_size
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    start = time.perf_counter()
    paths = write_photos(folder, args.num_images, size, args.workers, args.seed)
    print(f"\n(ii) wrote {len(paths)} JPEGs of {size[0]}x{size[1]} (quality 90) in {time.perf_counter() - start:.1f}s")
    dataset = ImageDataset(paths, [0] * len(paths), eval_transform(n))
    batch_sizes = {args.batch, len(paths) % args.batch}

    precision = args.precision[0]
    dtype, amp = PRECISIONS[precision]
    published = PublishedViT.from_model(model)
    warm_up(published, n, batch_sizes, device, torch.float32)
    ours = copy.deepcopy(model).to(dtype).eval()
    if args.compile:
        ours = _compile(ours) or ours
    warm_up(ours, n, batch_sizes, device, dtype, amp)
    label = f"{precision}{' compiled' if args.compile else ''}"

    rows = []
    speed, input_only, loader_only, pub_features = run_published(dataset, args, device, published,
                                                                 args.published_workers)
    rows.append({"pipeline": f"published ({args.published_workers} workers)", "model": "published graph",
                 "images_per_s": speed, "input_per_s": input_only, "loader_per_s": loader_only, "ratio": 1.0,
                 "exact": "yes"})
    base, loader_base = speed, loader_only
    if args.workers != args.published_workers:
        speed, input_only, loader_only, _ = run_published(dataset, args, device, published, args.workers)
        rows.append({"pipeline": f"published ({args.workers} workers)", "model": "published graph",
                     "images_per_s": speed, "input_per_s": input_only, "loader_per_s": loader_only,
                     "ratio": speed / base, "exact": "yes"})

    count = min(len(paths), 256)
    exact_pipeline = make_pipeline("exact", n_px=n)
    exact_pixels = pixels_of(dataset, exact_pipeline, count, args, device)
    published_inputs = torch.stack([dataset[i][0] for i in range(count)]).to(device)
    identical = torch.equal(normalize_on_device(exact_pixels), published_inputs)
    # Whether plain arithmetic on this device would have been exact too (the table makes sure).
    arithmetic = torch.equal(normalize_on_device(exact_pixels, lookup=False), published_inputs)

    exact_features = None
    slot_settings = {"on": [None], "off": [False], "both": [None, False]}[args.slots]
    for decode in args.decode:
        for use_slots in slot_settings:
            note = (" no slots" if use_slots is False else " slots") if args.slots == "both" else ""
            pipeline = make_pipeline(decode, n_px=n)
            try:
                speed, input_only, loader_only, features = run_ours(dataset, pipeline, args, device, ours, amp,
                                                                    use_slots)
                pixels = exact_pixels if decode == "exact" else pixels_of(dataset, pipeline, count, args, device)
            except Exception as e:  # noqa: BLE001 - e.g. no simplejpeg: report and go on
                print(f"  decode={decode}{note} failed: {type(e).__name__}: {e}")
                continue
            if decode == "exact" and exact_features is None:
                exact_features = features
            pixel_diff = float((pixels.float() - exact_pixels.float()).abs().mean())
            cosine = None
            if exact_features is not None:
                cosine = float(F.cosine_similarity(features.double(), exact_features.double(), dim=1).min())
            rows.append({"pipeline": f"ours {decode}{note}", "model": f"ours {label}", "images_per_s": speed,
                         "input_per_s": input_only, "loader_per_s": loader_only, "ratio": speed / base,
                         "exact": "yes" if pipeline.exact else ("same px" if pixel_diff == 0 else "no"),
                         "pixel_diff": pixel_diff, "min_cos": cosine})
    for row in rows:
        if loader_base and row.get("loader_per_s"):
            row["loader_ratio"] = row["loader_per_s"] / loader_base
    if exact_features is not None:
        pub_cos = float(F.cosine_similarity(pub_features.double(), exact_features.double(), dim=1).min())
        rows[0]["min_cos"] = pub_cos
    print(f"(ii) end to end: {len(paths)} files -> embeddings on {device}, batch {args.batch} (ours: loaded in "
          f"batches of {args.loader_batch}), "
          f"{args.workers} workers (published baseline: {args.published_workers}), {args.model}; deviations vs "
          f"ours exact over all images (cosine) and the "
          f"first {count} (pixels)")
    print(f"  exact path bit-identical to the published transform on {count} images: {identical} "
          f"(plain (x / 255 - mean) / std on {device.type} would be: {arithmetic})")
    _table(rows, [("pipeline", "pipeline", "{}"), ("model", "model", "{}"), ("images_per_s", "images/s", "{:,.1f}"),
                  ("ratio", "vs published", "{:.2f}x"), ("input_per_s", "input only/s", "{:,.1f}"),
                  ("loader_ratio", "loader only vs published", "{:.2f}x"),
                  ("exact", "exact", "{}"), ("pixel_diff", "mean |px diff|", "{:.4f}"),
                  ("min_cos", "min cos vs exact", "{:.6f}")])
    rows.append({"exact_identical": identical, "arithmetic_identical": arithmetic})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (8 if args.quick else 512)
    args.loader_batch = args.loader_batch or min(args.batch, 64)
    embed_module.tqdm = lambda iterable, **_: iterable  # no progress bars between the tables
    args.workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 16)
    if args.published_workers is None:
        args.published_workers = min(8, args.workers)
    args.num_images = args.num_images or (64 if args.quick else 12000)
    args.iters = args.iters or (2 if args.quick else 30)
    args.precision = args.precision or (["fp16", "amp-fp16", "bf16", "fp32"] if gpu else ["fp32"])
    args.compile = gpu if args.compile is None else args.compile
    args.loader_only = (not gpu) if args.loader_only is None else args.loader_only
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
    machine = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    print(f"{args.model} on {device} ({machine}), {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, {args.workers} workers, precisions "
          f"{args.precision}, compile {args.compile}")

    torch.manual_seed(args.seed)
    model = unicom.create_model(args.model).eval().to(device)
    results: dict = {"args": vars(args), "machine": machine}
    with tempfile.TemporaryDirectory(prefix="unicom-bench-") as tmp:
        folder = Path(tmp)
        if not args.skip_model:
            n = model.config.input_size
            count = 8 if args.quick else 32
            paths = write_photos(folder, count, (500, 375), 1, args.seed + 10**6)
            transform = eval_transform(n)
            images = torch.stack([transform(Image.open(p)) for p in paths])
            results["model"] = bench_model(args, device, model, images)
            for p in paths:
                os.remove(p)
        if not args.skip_e2e:
            results["e2e"] = bench_e2e(args, device, model, folder)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
