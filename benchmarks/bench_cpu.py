"""Embedding on CPUs: fp32 eager against int8 and the other ways people run a ViT on a CPU.

In one process and one run, for each ``--models`` (random weights, seed 0) and ``--batches``:

* images/s of our ``VisionTransformer`` in fp32 eager (the baseline of every ratio), PyTorch's
  dynamic int8 (``unicom.quantize.quantize(backend="torch")``, also ``torch.compile``d), ONNX
  Runtime fp32 and int8 (``load(precision="int8")``'s backend), OpenVINO fp32 and int8 (NNCF's
  data-free int8 weight compression; needs ``nncf``), and the peers a CPU user would pick
  instead: open_clip's image tower and timm's ``vit_*_clip_224``, fp32, random weights. Each
  (model, batch) times every candidate in turn for ``--rounds`` rounds after a warm-up and
  keeps each one's best round, so a busy machine's noise falls on all of them alike;
* the minimum and mean cosine of each of ours to the fp32 eager embedding (same weights) on
  real photos (crops of scikit-learn's two sample images) and digits (scikit-learn's, upscaled);
* Recall@1 and MAP@R of ``retrieval.py --eval --dataset digits`` for each of ours, with the
  README's digits model (input 32, patch 8, width 64, depth 2, seed 0: ``--digits-model
  tiny``) or a registered architecture with random weights (seed 0); fp32 and int8 through the
  program itself, the other candidates through the same library call.

    python benchmarks/bench_cpu.py                 # B/32 and B/16 at batch 1, 8 and 32
    python benchmarks/bench_cpu.py --quick         # the same, fewer images (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import unicom  # noqa: E402
from unicom.checkpoint import save_model  # noqa: E402
from unicom.quantize import OnnxModel, export_onnx, quantize  # noqa: E402
from unicom.transforms import eval_transform  # noqa: E402

PEERS = {"ViT-B/32": ("vit_base_patch32_clip_224", "ViT-B-32"), "ViT-B/16": ("vit_base_patch16_clip_224", "ViT-B-16")}
BASELINE = "fp32 eager"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[("ViT-B/32", None), ("ViT-B/16", None)], type=_model_batches,
                   help=f"models ({', '.join(PEERS)}), each optionally with its own batch sizes: ViT-B/16:1,8")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="batch sizes of models without their own")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of every backend (torch, ONNX Runtime, OpenVINO); default: each one's own")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per candidate (default 3, 2 with --quick)")
    p.add_argument("--images", type=int, default=None,
                   help="images per candidate per round, at least one batch (default 32, 8 with --quick)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time PyTorch's int8 under torch.compile")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--digits-model", nargs="+", default=["tiny"], help="tiny (the README's) and/or a registered name")
    p.add_argument("--quick", action="store_true", help="fewer rounds and images")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def _model_batches(value: str) -> tuple[str, list[int] | None]:
    name, _, batches = value.partition(":")
    if name not in PEERS:
        raise argparse.ArgumentTypeError(f"expected one of {list(PEERS)}, optionally :BATCH,BATCH; got {value!r}")
    return name, [int(b) for b in batches.split(",")] if batches else None


# ----------------------------------------------------------------------------- candidates


class _OpenVINO(torch.nn.Module):
    """An OpenVINO compiled model behind the call our evaluation code makes."""

    def __init__(self, compiled, config) -> None:
        super().__init__()
        self.compiled, self.config = compiled, config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.compiled(x.float().contiguous().numpy())[0]))


def _openvino(model, int8: bool, threads: int | None):
    import openvino as ov

    example = torch.zeros(2, 3, model.config.input_size, model.config.input_size)
    converted = ov.convert_model(model, example_input=example)
    if int8:  # data-free: int8 weights, activations left to the CPU plugin (dynamic quantisation)
        import nncf

        converted = nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    return _OpenVINO(ov.Core().compile_model(converted, "CPU", config), model.config)


def _onnx_fp32(model, folder: Path, threads: int | None):
    path = folder / f"fp32_{model.config.input_size}_{model.config.patch_size}_{model.config.dim}.onnx"
    export_onnx(model, path)
    return OnnxModel(path, model.config, threads)


def build_candidates(model, folder: Path, compile: bool = True, skip: tuple[str, ...] = (),
                     threads: int | None = None) -> dict:
    """name -> a module computing ``model``'s embedding (float32 images in); unavailable ones are
    reported and left out."""
    builders = {
        BASELINE: lambda: model,
        "torch int8": lambda: quantize(model, "torch"),
        "torch int8 compiled": lambda: torch.compile(quantize(model, "torch")),
        "onnxruntime fp32": lambda: _onnx_fp32(model, folder, threads),
        "onnxruntime int8 (ours)": lambda: OnnxModel(quantize(model, "onnxruntime", cache_dir=folder).path,
                                                     model.config, threads),
        "openvino fp32": lambda: _openvino(model, False, threads),
        "openvino int8 (nncf weights)": lambda: _openvino(model, True, threads),
    }
    skip = (*skip, *(() if compile else ("torch int8 compiled",)))
    builders = {k: v for k, v in builders.items() if k not in skip}
    out = {}
    for name, build in builders.items():
        start = time.perf_counter()
        try:
            out[name] = build().eval()
        except Exception as e:  # an optional package missing or a backend failing: say so, measure the rest
            print(f"  ({name} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]})", flush=True)
            continue
        print(f"  built {name} in {time.perf_counter() - start:.1f}s", flush=True)
    return out


def peer_models(name: str) -> dict:
    timm_name, clip_name = PEERS[name]
    out = {}
    try:
        import timm

        out[f"timm {timm_name}"] = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    except Exception as e:
        print(f"  (timm unavailable: {e})")
    try:
        import open_clip

        out[f"open_clip {clip_name} image tower"] = open_clip.create_model(clip_name, pretrained=None).visual.eval()
    except Exception as e:
        print(f"  (open_clip unavailable: {e})")
    return out


# ----------------------------------------------------------------------------- measurements


@torch.inference_mode()
def time_round(module, x: torch.Tensor, calls: int) -> float:
    """Seconds per image over ``calls`` forward passes."""
    start = time.perf_counter()
    for _ in range(calls):
        module(x)
    return (time.perf_counter() - start) / (calls * x.shape[0])


def images_per_second(modules: dict, size: int, batch: int, rounds: int, images: int) -> dict:
    """name -> best images/s over ``rounds`` rounds, the candidates taking turns in each round."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    calls = max(1, -(-images // batch))
    best = {}
    with torch.inference_mode():
        for module in modules.values():  # warm-up: first-call allocations, compilation
            module(x)
    for _ in range(rounds):
        for name, module in modules.items():
            best[name] = min(best.get(name, float("inf")), time_round(module, x, calls))
    return {name: 1.0 / seconds for name, seconds in best.items()}


def real_images(size: int) -> dict[str, torch.Tensor]:
    """Photos: 16 crops (4 scales x 2 positions x 2 images) of scikit-learn's sample photos; digits:
    16 of scikit-learn's digits, 8x8 grey upscaled; both through the published eval transform."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    transform = eval_transform(size)
    photos = []
    for photo in load_sample_images().images:  # (427, 640, 3) uint8
        image = Image.fromarray(photo)
        for scale in (1.0, 0.75, 0.5, 0.3):
            w, h = int(image.width * scale), int(image.height * scale)
            for left, top in ((0, 0), (image.width - w, image.height - h)):
                photos.append(transform(image.crop((left, top, left + w, top + h))))
    digits = load_digits().images[:16]  # (16, 8, 8), values 0-16
    digit_images = [transform(Image.fromarray((d * 255 / 16).astype(np.uint8)).convert("RGB")) for d in digits]
    return {"photos": torch.stack(photos), "digits": torch.stack(digit_images)}


@torch.inference_mode()
def cosines(modules: dict, images: dict[str, torch.Tensor], batch: int = 8) -> dict:
    """name -> {set: (min, mean) cosine to the fp32 eager embedding}."""
    def embed(module, x):
        return torch.cat([module(x[i:i + batch]).float() for i in range(0, len(x), batch)])

    reference = {k: embed(modules[BASELINE], x) for k, x in images.items()}
    out = {}
    for name, module in modules.items():
        out[name] = {}
        for k, x in images.items():
            cos = F.cosine_similarity(embed(module, x), reference[k])
            out[name][k] = (float(cos.min()), float(cos.mean()))
    return out


def digits_model(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    if name == "tiny":  # the README's digits model
        model = unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2, num_heads=2)
    else:
        model = unicom.create_model(name)
    path = folder / f"digits_{name.replace('/', '-')}.pt"
    save_model(model, path)
    return path


def digits_retrieval(name: str, folder: Path, threads: int | None) -> dict:
    """candidate -> (Recall@1, MAP@R) on digits: fp32 and int8 through ``retrieval.py --eval``, the
    others through the same library call (``evaluate_retrieval``)."""
    from unicom.data import load_retrieval_dataset
    from unicom.evaluate import evaluate_retrieval
    from unicom.programs.retrieval import main as retrieval

    path = digits_model(name, folder)
    out = {}
    for precision, label in (("fp32", BASELINE), ("int8", "onnxruntime int8 (ours)")):
        output = folder / f"digits_{precision}"
        retrieval(["--eval", "--dataset", "digits", "--model_name", str(path), "--num_workers", "0", "--device", "cpu",
                   "--batch_size", "32", "--precision", precision, "--output", str(output)])
        record = json.loads((output / "results.json").read_text())
        out[label] = (record["recall"]["1"], record["map_at_r"], record["precision"])
        logging.getLogger().setLevel(logging.WARNING)  # the program set INFO for its own lines
    model, transform = unicom.load(path, device="cpu")
    data = load_retrieval_dataset("digits", "data", "test", transform)
    for label, module in build_candidates(model, folder, compile=False, skip=tuple(out), threads=threads).items():
        record = evaluate_retrieval(module, data.query, data.gallery, ks=data.ks, batch_size=32).record()
        out[label] = (record["recall"]["1"], record["map_at_r"], "library")
    return out


# ----------------------------------------------------------------------------- report


def print_speed(model_name: str, speeds: dict[int, dict], cos: dict) -> None:
    batches = sorted(speeds)
    head = " | ".join(f"batch {b}" for b in batches)
    print(f"\n{model_name}: images/s (ratio to {BASELINE}); cosine to fp32 eager, min / mean\n")
    print(f"| | {head} | photos | digits |")
    print("|---" * (len(batches) + 3) + "|")
    for name in speeds[batches[0]]:
        cells = []
        for b in batches:
            rate, base = speeds[b].get(name), speeds[b][BASELINE]
            cells.append(f"{rate:.2f} ({rate / base:.2f}x)" if rate else "-")
        c = cos.get(name)
        sims = [f"{c[k][0]:.5f} / {c[k][1]:.5f}" if c else "-" for k in ("photos", "digits")]
        print(f"| {name} | " + " | ".join(cells + sims) + " |")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    images = args.images or (8 if args.quick else 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average at start {load}", flush=True)
    results: dict = {"models": {}, "digits": {}, "load_average_at_start": load}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["UNICOM_CACHE_DIR"] = str(folder)  # the programs' int8 files: gone with the run
        for model_name, batches in args.models:
            print(f"\n{model_name}:", flush=True)
            torch.manual_seed(0)
            model = unicom.create_model(model_name).eval()
            ours = build_candidates(model, folder, args.compile, threads=args.threads)
            cos = cosines(ours, real_images(model.config.input_size))
            modules = {**ours, **({} if args.skip_peers else peer_models(model_name))}
            speeds = {}
            for batch in batches or args.batches:
                start = time.perf_counter()
                speeds[batch] = images_per_second(modules, model.config.input_size, batch, rounds, images)
                print(f"  batch {batch}: {time.perf_counter() - start:.0f}s", flush=True)
            print_speed(model_name, speeds, cos)
            results["models"][model_name] = {"images_per_second": speeds, "cosine": cos}
            del ours, modules
        for name in args.digits_model:
            print(f"\ndigits, model {name}: Recall@1 / MAP@R", flush=True)
            scores = digits_retrieval(name, folder, args.threads)
            for label, (r1, mapr, how) in scores.items():
                print(f"| {label} | {r1:.2f} | {mapr:.2f} | {how} |")
            results["digits"][name] = scores
    print(f"\nload average at the end {os.getloadavg() if hasattr(os, 'getloadavg') else None}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
