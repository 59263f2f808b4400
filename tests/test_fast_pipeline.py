"""Fast input pipelines (``unicom.data.fast``) against the published float transform.

The exact paths must give the very pixels, and the very float tensors, of the published
``Resize -> CenterCrop -> RGB -> ToTensor -> Normalize`` on real photographs (scikit-learn's
sample images) of many sizes and modes; the pixel-changing options must stay close. Files are
real JPEG and PNG files on disk, loaded by real DataLoader worker processes.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic_datasets as synth  # noqa: E402
from published_vit import PublishedViT  # noqa: E402

import unicom  # noqa: E402
from unicom.checkpoint import save_model  # noqa: E402
from unicom.data import BadImageError, ImageDataset, sharded_loader  # noqa: E402
from unicom.data.fast import (  # noqa: E402
    DECODE_CHOICES,
    EXACT_DECODES,
    LOADER_BATCH,
    InputPipeline,
    _pillow_order_rule,
    _resize_group,
    embedding_loader,
    eval_transform_uint8,
    normalization_table,
    normalize_on_device,
    pillow_resize_crop,
    pipeline_loader,
    resized_size,
    resolve_decode,
)
from unicom.evaluate import embed_loader  # noqa: E402
from unicom.transforms import MEAN, STD, eval_transform, train_transform  # noqa: E402
from unicom.transforms import test_transform as finetune_test_transform  # noqa: E402  (not a test)

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, and are what we test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CPU = torch.device("cpu")
# Per-channel std in 0-255 units: turns a difference of normalised values back into pixels.
PIXEL = torch.tensor(STD).view(1, 3, 1, 1) * 255


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(a) for a in load_sample_images().images]  # china, flower: 640x427 RGB


def crops(photos, count: int, max_w: int, max_h: int, seed: int, min_side: int = 3) -> list[Image.Image]:
    """Random crops (any aspect ratio, down to a few pixels) of the sample photographs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = photos[i % 2]
        w, h = int(rng.integers(min_side, max_w + 1)), int(rng.integers(min_side, max_h + 1))
        x0, y0 = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
        out.append(image.crop((x0, y0, x0 + w, y0 + h)))
    return out


def as_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return image.quantize(64)
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return image.convert(mode)


# ----------------------------------------------------------------------------- device-side normalisation


def test_table_is_the_published_tail_for_every_value():
    """Each of the 256 values of each channel: ToTensor + Normalize == the table, bit for bit."""
    rng = np.random.default_rng(0)
    values = np.stack([rng.permutation(256) for _ in range(3)], axis=-1).astype(np.uint8).reshape(16, 16, 3)
    image = Image.fromarray(values, mode="RGB")
    expected = eval_transform(16).transforms[-1](eval_transform(16).transforms[-2](image))  # Normalize(ToTensor)
    pixels = torch.from_numpy(values).permute(2, 0, 1)[None].contiguous()
    for lookup in (True, False):  # the table (other devices) and the ops (CPU)
        assert torch.equal(normalize_on_device(pixels, lookup=lookup)[0], expected)
    table = normalization_table()
    assert table.shape == (3, 256) and table.dtype == torch.float32
    # and the arithmetic it stands for, in float64, to float32 rounding
    ref = (torch.arange(256, dtype=torch.float64) / 255 - torch.tensor(MEAN, dtype=torch.float64)[:, None]) / \
        torch.tensor(STD, dtype=torch.float64)[:, None]
    assert torch.allclose(table.double(), ref, rtol=0, atol=1e-6)


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_uint8_transform_then_table_is_the_published_transform(photos, mode):
    """eval_transform_uint8 + normalize_on_device == eval_transform (torch.equal) on real photos."""
    for image in crops(photos, 6, 640, 427, seed=len(mode)) + [photos[0], photos[1].resize((224, 300))]:
        image = as_mode(image, mode)
        for n_px, resize in ((224, None), (32, 36)):
            published = eval_transform(n_px) if resize is None else finetune_test_transform(n_px)
            expected = published(image)
            pixels = eval_transform_uint8(n_px, resize)(image)
            assert pixels.dtype == torch.uint8 and pixels.shape == (3, n_px, n_px)
            assert torch.equal(normalize_on_device(pixels[None], lookup=True)[0], expected), (mode, image.size, n_px)
            assert torch.equal(normalize_on_device(pixels[None])[0], expected), (mode, image.size, n_px)


# ----------------------------------------------------------------------------- Pillow's resize on tensors


def test_device_resize_bit_identical_to_pillow_on_many_sizes(photos):
    """Upscaling, downscaling, extreme aspect ratios, both of Pillow's pass orders, crops == whole."""
    images = crops(photos, 60, 200, 200, seed=1, min_side=2)
    images += [photos[0].crop((0, 0, 300, 9)), photos[1].crop((0, 0, 7, 260)), photos[0].crop((0, 0, 48, 48))]
    tensors = [torch.from_numpy(np.array(im)) for im in images]  # (H, W, 3)
    rule = _pillow_order_rule()
    for n_px, resize in ((48, None), (24, 27), (17, None)):
        got = pillow_resize_crop(tensors, n_px, resize, CPU)
        expected = torch.stack([eval_transform_uint8(n_px, resize)(im) for im in images])
        same = (got == expected).flatten(1).all(1)
        assert same.all(), [images[i].size for i in torch.nonzero(~same).flatten().tolist()]
        orders = {rule(w, h, *resized_size(w, h, resize or n_px)) for w, h in (im.size for im in images)}
        assert orders == {True, False} or rule(100, 100, 90, 10) is False  # both orders exercised where they exist


def test_resize_group_matches_pillow_for_arbitrary_output_sizes():
    """The core resampler, no crop: any (w, h) -> (w', h') as Image.resize does it."""
    rng = np.random.default_rng(2)
    rule = _pillow_order_rule()
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(4, 90, size=2))
        nh, nw = (int(v) for v in rng.integers(3, 120, size=2))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        expected = torch.from_numpy(np.array(Image.fromarray(pixels).resize((nw, nh), Image.BICUBIC)))
        got = _resize_group(torch.from_numpy(pixels)[None], [(h, w)], [(nw, nh)], [(0, 0)], (nh, nw),
                            vertical_first=rule(w, h, nw, nh))
        assert torch.equal(got[0].permute(1, 2, 0), expected), (w, h, nw, nh)


# ----------------------------------------------------------------------------- pipelines on files


@pytest.fixture(scope="module")
def files(photos, tmp_path_factory) -> list[str]:
    """JPEGs of several sizes (a large one for draft mode), a grayscale and a CMYK JPEG, and PNGs."""
    folder = tmp_path_factory.mktemp("photos")
    specs = [((160, 120), "RGB", "jpg"), ((120, 160), "RGB", "jpg"), ((400, 300), "RGB", "jpg"),
             ((90, 90), "L", "jpg"), ((130, 97), "CMYK", "jpg"), ((70, 50), "RGBA", "png"), ((64, 200), "P", "png"),
             ((33, 41), "RGB", "jpg")]
    paths = []
    for i, (size, mode, ext) in enumerate(specs):
        image = as_mode(photos[i % 2].resize(size, Image.BICUBIC), mode)
        path = folder / f"{i:02d}.{ext}"
        image.save(path, **({"quality": 90} if ext == "jpg" else {}))
        paths.append(str(path))
    return paths


def published_batch(paths, n_px: int, resize: int | None = None) -> torch.Tensor:
    transform = eval_transform(n_px) if resize is None else finetune_test_transform(n_px)
    dataset = ImageDataset(paths, [0] * len(paths), transform)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def run_pipeline(paths, decode: str, n_px: int = 48, workers: int = 0, batch: int = 3, resize=None,
                 normalize_in_workers: bool | None = None, **kw):
    transform = eval_transform(n_px) if resize is None else finetune_test_transform(n_px)
    dataset = ImageDataset(paths, list(range(len(paths))), transform, **kw)
    pipeline = InputPipeline.from_transform(transform, decode)
    images, oks, indices = [], [], []
    loader = pipeline_loader(dataset, pipeline, batch, workers, normalize_in_workers=normalize_in_workers)
    for x, labels, idx, ok in loader:
        if isinstance(x, torch.Tensor):  # exact, draft, tv: uint8 crops, or normalised in the workers
            assert x.is_floating_point() == (normalize_in_workers is not False)
        assert torch.equal(labels, idx)
        x, ok = pipeline.to_device(x, ok, CPU)
        images.append(x)
        oks.append(ok)
        indices.append(idx)
    return torch.cat(images), torch.cat(oks), torch.cat(indices)


@pytest.mark.parametrize("decode", ["exact", "device-resize"])
@pytest.mark.parametrize("normalize_in_workers", [False, True])
def test_exact_pipelines_bit_identical_on_files(files, decode, normalize_in_workers):
    for n_px, resize in ((48, None), (32, 36)):
        images, ok, indices = run_pipeline(files, decode, n_px, resize=resize,
                                           normalize_in_workers=normalize_in_workers)
        assert torch.equal(indices, torch.arange(len(files))) and ok.all()
        assert torch.equal(images, published_batch(files, n_px, resize))


def test_exact_pipelines_with_worker_processes(files):
    """Shared-memory batches from 2 worker processes, uneven last batch, same tensors."""
    expected = published_batch(files, 48)
    for decode in ("exact", "device-resize", "device-decode"):
        images, ok, indices = run_pipeline(files, decode, workers=2, batch=3, normalize_in_workers=False)
        assert torch.equal(indices, torch.arange(len(files))) and ok.all()
        if decode == "device-decode":  # torchvision's CPU decoder is libjpeg-turbo, as PIL's
            assert ((images - expected).abs() * PIXEL).mean() < 0.5
        else:
            assert torch.equal(images, expected)


@pytest.mark.parametrize("decode", ["draft", "tv", "device-decode"])
def test_pixel_changing_options_stay_close(files, decode):
    expected = published_batch(files, 48)
    images, ok, _ = run_pipeline(files, decode)
    assert images.shape == expected.shape and images.dtype == torch.float32 and ok.all()
    per_image = ((images - expected).abs() * PIXEL).flatten(1).mean(1)  # mean |pixel difference|, 0-255
    assert per_image.max() < 2.5, per_image
    cos = torch.nn.functional.cosine_similarity(images.flatten(1).double(), expected.flatten(1).double(), dim=1)
    assert cos.min() > 0.999
    if decode == "draft":  # only the 400x300 JPEG is large enough for a 1/2-scale decode at n=48 ...
        changed = torch.nonzero(per_image > 0).flatten().tolist()
        assert changed == [2]
    if decode == "tv":  # ... while torchvision's resize differs a little everywhere it resizes
        assert (per_image > 0).sum() >= 6


def test_draft_mode_decodes_large_jpegs_at_reduced_scale(photos, tmp_path):
    path = tmp_path / "big.jpg"
    photos[0].save(path, quality=90)  # 640x427: 1/8 scale would be 80x54
    dataset = ImageDataset([str(path)], [0], eval_transform(48))
    wrapped = InputPipeline("draft", n_px=48).dataset(dataset)
    assert wrapped._pil(0).size == (160, 107)  # 1/4 scale: the smallest keeping the short side >= 2 * 48
    assert InputPipeline("draft", n_px=48, draft_factor=4).dataset(dataset)._pil(0).size == (320, 214)


@pytest.mark.parametrize("decode", DECODE_CHOICES)
def test_bad_images_raise_or_are_skipped(files, tmp_path, decode):
    bad = synth.make_bad_images(tmp_path)["truncated"]
    paths = [files[0], str(bad), files[2]]
    with pytest.raises(BadImageError, match="truncated.jpg"):
        run_pipeline(paths, decode)
    images, ok, indices = run_pipeline(paths, decode, skip_bad_images=True)
    assert ok.tolist() == [True, False, True] and torch.equal(indices, torch.arange(3))
    expected = published_batch([files[0], files[2]], 48)
    keep = images[ok]
    if decode in ("exact", "device-resize"):
        assert torch.equal(keep, expected)
    else:
        assert ((keep - expected).abs() * PIXEL).mean() < 2.5


def test_in_memory_samples(photos):
    """Images held in memory (the digits dataset) take the PIL path in every pipeline."""
    samples = [np.asarray(photos[0].resize((60, 40))), photos[1].resize((30, 50))]
    expected = torch.stack([eval_transform(24)(Image.fromarray(samples[0])), eval_transform(24)(samples[1])])
    for decode in DECODE_CHOICES:
        dataset = ImageDataset(samples, [0, 1], eval_transform(24))
        pipeline = InputPipeline.from_transform(dataset.transform, decode)
        (x, _, _, ok), = list(pipeline_loader(dataset, pipeline, 2, 0, normalize_in_workers=False))
        images, ok = pipeline.to_device(x, ok, CPU)
        if decode == "tv":
            assert ((images - expected).abs() * PIXEL).mean() < 2.5
        else:
            assert torch.equal(images, expected), decode


def test_pipeline_recognises_only_the_published_transforms():
    assert InputPipeline.from_transform(eval_transform(224)) == InputPipeline("exact", 224, 224)
    assert InputPipeline.from_transform(finetune_test_transform(224), "tv") == InputPipeline("tv", 224, 256)
    assert InputPipeline.from_transform(train_transform(224, "timm")) is None
    assert InputPipeline.from_transform(None) is None
    with pytest.raises(ValueError, match="decode"):
        InputPipeline("nvdali")


def test_device_side_resizing_on_a_cpu_warns(files, caplog):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    with caplog.at_level("WARNING", logger="unicom.data.fast"):
        embedding_loader(dataset, "auto", 4, 0, CPU)
        embedding_loader(dataset, "exact", 4, 0, CPU)
        assert "slower" not in caplog.text
        embedding_loader(dataset, "turbo", 4, 0, CPU)
    assert "decode=turbo resizes on the device, which is the CPU here" in caplog.text


def test_embedding_loader_falls_back_for_other_transforms(files):
    dataset = ImageDataset(files[:2], [0, 1], train_transform(32, "timm"))
    loader, preprocess = embedding_loader(dataset, "tv", 2, 0, CPU)
    assert preprocess is None
    (x, *_), = list(loader)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)


def test_sharding_matches_sharded_loader(files):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    pipeline = InputPipeline.from_transform(dataset.transform)
    for rank in range(3):
        ours = [i for *_, idx, _ in pipeline_loader(dataset, pipeline, 2, 0, CPU, rank, 3) for i in idx.tolist()]
        theirs = [i for *_, idx, _ in sharded_loader(dataset, 2, 0, rank, 3) for i in idx.tolist()]
        assert ours == theirs


# ----------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2, num_heads=2)
    return model.eval()


@pytest.mark.parametrize("decode", ["exact", "device-resize"])
def test_embed_loader_exact_paths_equal_the_float_path(files, tiny_model, decode):
    for transform in (eval_transform(32), finetune_test_transform(32)):
        dataset = ImageDataset(files, list(range(len(files))), transform)
        reference = embed_loader(tiny_model, sharded_loader(dataset, 3, 0), CPU)
        loader, preprocess = embedding_loader(dataset, decode, 3, 0, CPU)
        assert preprocess is not None
        ours = embed_loader(tiny_model, loader, CPU, preprocess=preprocess)
        assert torch.equal(ours.features, reference.features)
        assert torch.equal(ours.indices, reference.indices) and torch.equal(ours.labels, reference.labels)


def test_embed_loader_casts_inputs_to_half_weights(files, tiny_model):
    dataset = ImageDataset(files[:3], [0, 1, 2], eval_transform(32))
    loader, preprocess = embedding_loader(dataset, "exact", 3, 0, CPU)
    reference = embed_loader(tiny_model, loader, CPU, preprocess=preprocess).features.double()
    half = embed_loader(tiny_model.to(torch.bfloat16), loader, CPU, preprocess=preprocess).features
    tiny_model.float()
    assert half.dtype == torch.float32
    assert (half.double() - reference).norm() / reference.norm() < 3e-2


def test_published_peer_is_the_published_graph(fixtures_dir, tiny_model):
    """benchmarks/published_vit.py: the fixture's float64 outputs, and our model's, in float32."""
    io_ = torch.load(fixtures_dir / "tiny_reference_io.pt", weights_only=True)
    state = torch.load(fixtures_dir / "tiny_reference_fp16.pt", weights_only=True)
    peer = PublishedViT(**io_["config"]).eval()
    peer.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        out = peer(io_["input"].float()).double()
    assert (out - io_["embedding"]).norm() / io_["embedding"].norm() < 1e-5
    copy = PublishedViT.from_model(tiny_model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(copy(x), tiny_model(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the programs' option


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(tiny_model, path)
    return str(path)


@pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning")
def test_retrieval_program_decode_option(checkpoint, tmp_path):
    from unicom.programs.retrieval import main

    written = synth.make_cub(tmp_path / "data", num_classes=6, per_class=3)
    records = {}
    for decode in ("exact", "device-resize", "tv", "turbo"):
        out = tmp_path / decode
        argv = ["--eval", "--dataset", "cub", "--data-root", str(written.root), "--model_name", checkpoint,
                "--output", str(out), "--num_workers", "0", "--batch_size", "4", "--device", "cpu",
                "--decode", decode]
        assert main(argv) == 0
        records[decode] = json.loads((out / "results.json").read_text())
    keys = ("recall", "map_at_r", "r_precision", "num_query")
    assert {k: records["device-resize"][k] for k in keys} == {k: records["exact"][k] for k in keys}
    assert {k: records["turbo"][k] for k in keys} == {k: records["exact"][k] for k in keys}
    assert records["tv"]["num_query"] == records["exact"]["num_query"] == 9
    assert records["turbo"]["decode"] == "turbo" and records["exact"]["precision"] == "fp32"
    assert records["exact"]["device"] == "cpu" and records["exact"]["compile"] is False


def test_knn_program_decode_option(checkpoint, tmp_path):
    from unicom.programs.knn import main

    synth.make_image_folder(tmp_path / "train", ["ant", "bee", "cat"], per_class=3)
    synth.make_image_folder(tmp_path / "val", ["ant", "bee"], per_class=2, seed=1)
    results = {}
    for decode in ("exact", "draft"):
        out = tmp_path / decode
        argv = ["--train-dataset", str(tmp_path / "train"), "--val-dataset", str(tmp_path / "val"),
                "--model-name", checkpoint, "--output-dir", str(out), "--num-workers", "0", "--batch-size", "4",
                "--device", "cpu", "--nb_knn", "1", "3", "--decode", decode]
        assert main(argv) == 0
        results[decode] = json.loads((out / "results_eval_knn.json").read_text())
    assert results["draft"]["knn"] == results["exact"]["knn"]  # tiny JPEGs: draft mode changes nothing
    assert results["exact"]["num_train"] == 9 and results["exact"]["num_val"] == 4
    assert results["draft"]["decode"] == "draft" and results["draft"]["precision"] == "fp32"


def test_device_decode_falls_back_to_pil_for_bytes_the_decoder_refuses(files):
    """A JPEG the batched decoder rejects is decoded one by one, then by PIL."""
    from unicom.data.fast import EncodedBatch, _decode_on

    good = torch.frombuffer(bytearray(Path(files[0]).read_bytes()), dtype=torch.uint8)
    png = Image.open(files[5]).convert("RGB")
    buffer = io.BytesIO()
    png.save(buffer, "PNG")  # not a JPEG: torchvision's decode_jpeg refuses it, PIL reads it
    other = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    batch = EncodedBatch([good, other], [True, True], ["a.jpg", "b.png"], skip_bad_images=False)
    images, ok = _decode_on(batch, torch.tensor([True, True]), CPU)
    assert ok.all() and images[0].shape == (120, 160, 3)
    assert torch.equal(images[1], torch.from_numpy(np.array(png)))
    garbage = torch.tensor([0xFF, 0xD8, 0xFF, 1, 2, 3], dtype=torch.uint8)
    with pytest.raises(BadImageError, match="c.jpg"):
        _decode_on(EncodedBatch([garbage], [True], ["c.jpg"], False), torch.tensor([True]), CPU)
    _, ok = _decode_on(EncodedBatch([garbage], [True], ["c.jpg"], True), torch.tensor([True]), CPU)
    assert ok.tolist() == [False]


class _RecordingModel(torch.nn.Module):
    """A model that records the batch sizes it is called with."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("loader_batch, batch_size, expected", [(3, 4, [4, 4]), (2, 8, [8]), (5, 3, [3, 3, 2])])
def test_embed_loader_gathers_small_loader_batches_into_model_batches(files, tiny_model, loader_batch, batch_size,
                                                                      expected):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))  # 8 images
    reference = embed_loader(tiny_model, sharded_loader(dataset, len(files), 0), CPU)
    loader, preprocess = embedding_loader(dataset, "exact", batch_size, 0, CPU, loader_batch_size=loader_batch)
    assert loader.batch_size == loader_batch
    recording = _RecordingModel(tiny_model)
    ours = embed_loader(recording, loader, CPU, preprocess=preprocess, batch_size=batch_size)
    assert recording.calls == expected
    assert torch.allclose(ours.features, reference.features, atol=1e-6)  # only the batch composition differs
    assert torch.equal(ours.indices, reference.indices) and torch.equal(ours.labels, reference.labels)


def test_embedding_loader_batches_are_small_by_default(files):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    assert embedding_loader(dataset, "exact", 512, 0, CPU)[0].batch_size == LOADER_BATCH
    assert embedding_loader(dataset, "exact", 4, 0, CPU)[0].batch_size == 4


def test_auto_decode_is_exact_on_every_device():
    assert resolve_decode("auto", "cpu") == "exact"
    assert resolve_decode("auto", torch.device("cuda", 0)) == "device-resize"  # a device name, no GPU needed
    assert resolve_decode("tv", "cuda") == "tv"
    for name in ("auto", "exact", "device-resize"):
        assert resolve_decode(name, "cuda") in EXACT_DECODES and resolve_decode(name, "cpu") in EXACT_DECODES
    with pytest.raises(ValueError, match="expected auto or one of"):
        resolve_decode("nvjpeg", "cpu")


def test_device_resize_batches_carry_their_resampling_tables(files):
    """The workers build the coefficient tables; the device only expands them (same pixels)."""
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    pipeline = InputPipeline("device-resize", n_px=32)
    wrapped = pipeline.dataset(dataset)
    images, _, _, ok = wrapped.collate([wrapped[i] for i in range(len(files))])
    assert all(len(group[4]) == 4 and group[4][1].dtype == torch.int64 for group in images.groups)
    pixels, _ = pipeline.pixels(images, ok, CPU)
    expected = torch.stack([eval_transform_uint8(32)(Image.open(p)) for p in files])
    assert torch.equal(pixels, expected)


def test_compile_flag_is_for_evaluation_only(checkpoint, tmp_path):
    from unicom.programs.retrieval import main

    with pytest.raises(ValueError, match="--compile applies to --eval"):
        main(["--dataset", "cub", "--data-root", str(tmp_path), "--model_name", checkpoint, "--compile",
              "--device", "cpu", "--output", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- shared-memory slots


def _loader_batches(paths, decode, use_slots, workers=2, batch=2, skip_bad_images=False):
    dataset = ImageDataset(paths, list(range(len(paths))), eval_transform(48), skip_bad_images=skip_bad_images)
    pipeline = InputPipeline(decode, n_px=48)
    loader = pipeline_loader(dataset, pipeline, batch, workers, CPU, normalize_in_workers=False, use_slots=use_slots)
    kinds, pixels, oks, indices = set(), [], [], []
    for images, _, idx, ok in loader:
        kinds.add(type(images).__name__)
        x, ok = pipeline.pixels(images, ok, CPU)
        pixels.append(x)
        oks.append(ok)
        indices.append(idx)
    return kinds, torch.cat(pixels), torch.cat(oks), torch.cat(indices)


@pytest.mark.parametrize("decode, packed", [("exact", "PackedCrops"), ("tv", "PackedCrops"),
                                            ("device-resize", "PackedImages"), ("turbo", "PackedImages")])
def test_slots_deliver_the_same_batches(files, decode, packed):
    """Worker processes write into reused shared-memory slots: same pixels, order, indices."""
    kinds, pixels, ok, indices = _loader_batches(files * 3, decode, use_slots=True)  # 12 batches > 6 slots
    assert kinds == {packed}
    reference_kinds, reference, _, _ = _loader_batches(files * 3, decode, use_slots=False)
    assert packed not in reference_kinds
    assert torch.equal(pixels, reference) and ok.all() and torch.equal(indices, torch.arange(len(files) * 3))


def test_slots_fall_back_for_batches_too_large(files, monkeypatch):
    from unicom.data import fast, slots

    slots.clear()  # else an idle pool of an earlier loader, with room to spare, is taken
    monkeypatch.setattr(fast, "_image_allowance", lambda dataset: 16)  # no batch of whole images fits its slot
    kinds, pixels, _, _ = _loader_batches(files, "device-resize", use_slots=True)
    assert kinds == {"PaddedGroups"}
    assert torch.equal(pixels, _loader_batches(files, "device-resize", use_slots=False)[1])


def test_slots_with_bad_images_skipped(files, tmp_path):
    bad = str(synth.make_bad_images(tmp_path)["truncated"])
    paths = [files[0], bad, files[2], bad]
    for decode in ("exact", "device-resize", "turbo"):
        kinds, pixels, ok, _ = _loader_batches(paths, decode, use_slots=True, skip_bad_images=True)
        assert kinds == {"PackedCrops" if decode == "exact" else "PackedImages"}
        assert ok.tolist() == [True, False, True, False]
        assert torch.equal(pixels[ok], eval_transform_uint8_batch([files[0], files[2]]))


def eval_transform_uint8_batch(paths):
    return torch.stack([eval_transform_uint8(48)(Image.open(p)) for p in paths])


def test_slots_detect_batches_used_out_of_order(files):
    """Holding batches back lets workers reuse their slots: using one then raises, never wrong pixels."""
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(48))
    pipeline = InputPipeline("exact", n_px=48)
    loader = pipeline_loader(dataset, pipeline, 1, 1, CPU, normalize_in_workers=False, use_slots=True,
                             prefetch_factor=1)  # 3 slots, 8 batches
    batches = list(loader)
    with pytest.raises(RuntimeError, match="overwritten"):
        for images, _, _, ok in batches:
            pipeline.pixels(images, ok, CPU)


def test_slot_pool_basics():
    from unicom.data import slots

    pool = slots.SlotPool(2, 8)
    assert pool.slot_for(0, 9) is None  # too large
    slot, view = pool.slot_for(3, 4)
    assert slot == 1
    view.copy_(torch.arange(4, dtype=torch.uint8))
    ref = pool.ref(slot, 3, 4)
    assert ref.pin_memory() is ref and slots.pool_of(ref) is pool
    out = pool.fetch(ref, CPU)
    view.zero_()
    assert out.tolist() == [0, 1, 2, 3]  # a copy: the slot may be rewritten at once
    pool.slot_for(5, 4)  # the next user of slot 1
    with pytest.raises(RuntimeError, match="batch 3 was overwritten by batch 5"):
        pool.fetch(ref, CPU)
    slots.release(pool.id)
    with pytest.raises(RuntimeError, match="pool is gone"):
        slots.pool_of(ref)
    with pytest.raises(ValueError):
        slots.SlotPool(0, 8)


def test_slot_pools_are_reused_by_the_next_loader(files):
    """A finished loader gives its pool back; the next one with the same needs takes it (no new
    shared memory), under a new id, so a batch of the old loader can no longer be fetched."""
    import gc

    from unicom.data import slots

    slots.clear()
    dataset = ImageDataset(files * 2, list(range(len(files) * 2)), eval_transform(48))
    pipeline = InputPipeline("device-resize", n_px=48)
    expected = eval_transform_uint8_batch(files * 2)
    pools, old_batch = [], None
    for _ in range(2):
        loader = pipeline_loader(dataset, pipeline, 2, 2, CPU, normalize_in_workers=False, use_slots=True)
        pixels = []
        for images, _, _, ok in loader:
            pools.append(slots.pool_of(images.ref))
            pixels.append(pipeline.pixels(images, ok, CPU)[0])
            old_batch = old_batch or (images, ok)
        assert torch.equal(torch.cat(pixels), expected)
        del loader
        gc.collect()
    assert pools[0] is pools[-1] and len({id(p) for p in pools}) == 1  # one pool for both loaders
    with pytest.raises(RuntimeError, match="pool is gone"):
        pipeline.pixels(*old_batch, CPU)
    assert slots._IDLE == [pools[0]]
    slots.clear()
    assert slots._IDLE == []


def test_slot_pool_acquire_takes_an_idle_pool_that_fits():
    from unicom.data import slots

    slots.clear()
    pool = slots.acquire(4, 100)
    first_id = pool.id
    pool.owner.fill_(7)
    slots.release(pool.id)
    assert slots.acquire(6, 100) is not pool  # too few slots: a new pool; the idle one stays
    smaller = slots.acquire(3, 50)  # fits in the idle pool
    assert smaller is pool and pool.id != first_id and (pool.owner == -1).all()
    slots.release(pool.id)
    other = slots.acquire(2, 10_000)
    slots.release(other.id)
    assert slots._IDLE == [other]  # at most MAX_IDLE (1) kept: the newest
    slots.clear()


def test_whole_image_slots_are_sized_from_the_images(files, tmp_path):
    from unicom.data.fast import _IMAGE_ALLOWANCE, _image_allowance

    dataset = ImageDataset(files, list(range(len(files))), eval_transform(48))
    largest = max(3 * Image.open(p).size[0] * Image.open(p).size[1] for p in files)  # the 400x300 JPEG
    assert _image_allowance(dataset) == int(1.25 * largest)
    in_memory = ImageDataset([np.zeros((10, 20, 3), np.uint8)], [0], eval_transform(48))
    assert _image_allowance(in_memory) == int(1.25 * 600)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert _image_allowance(ImageDataset([str(tmp_path / "bad.jpg")], [0], eval_transform(48))) == _IMAGE_ALLOWANCE


def test_slot_pool_size_from_the_environment(files, monkeypatch):
    monkeypatch.setenv("UNICOM_SLOT_POOL_MB", "0")  # whole-image slots off
    kinds, _, _, _ = _loader_batches(files, "device-resize", use_slots=None)
    assert kinds == {"PaddedGroups"}
    assert _loader_batches(files, "exact", use_slots=None)[0] == {"PackedCrops"}  # crops are small: still on
    monkeypatch.setenv("UNICOM_SLOT_POOL_MB", "lots")
    with pytest.raises(ValueError, match="UNICOM_SLOT_POOL_MB"):
        _loader_batches(files, "device-resize", use_slots=None)


def test_tv_decode_gives_pils_pixels_where_the_decoders_agree(files):
    """torchvision's libjpeg-turbo in the workers, Pillow's resize replayed on the device.

    RGB and grayscale JPEGs are decoded by torchvision, the CMYK JPEG and the PNGs by PIL.
    On these files (and every file checked so far) the two decoders agree, so the pixels are
    the published ones; the test says so if a future build of either stops agreeing.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from unicom.data.fast import _tv_hwc
    from unicom.transforms import to_rgb

    for path in files:
        if path.endswith(".jpg"):
            turbo = _tv_hwc(decode_jpeg(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8),
                                           mode=ImageReadMode.UNCHANGED))
            pil = torch.from_numpy(np.array(to_rgb(Image.open(path))))
            if Image.open(path).mode == "CMYK":
                assert turbo is None
            else:
                assert torch.equal(turbo, pil), path
    for workers in (0, 2):
        kinds, pixels, ok, _ = _loader_batches(files, "tv-decode", use_slots=None, workers=workers)
        assert kinds == ({"PackedImages"} if workers else {"PaddedGroups"}) and ok.all()
        assert torch.equal(pixels, eval_transform_uint8_batch(files))


@pytest.mark.parametrize("decode", ["device-resize", "tv-decode", "turbo"])
def test_slots_with_groups_of_one_size_and_of_many(files, decode):
    """Images of one size lie as one block in the slot (no copies on the device); mixed sizes are padded."""
    uniform = [files[0]] * 4 + [files[1]] * 4  # 160x120 and 120x160: one group each
    mixed = files[:4] * 2
    for paths in (uniform, mixed):
        kinds, pixels, ok, _ = _loader_batches(paths, decode, use_slots=True, batch=4)
        assert kinds == {"PackedImages"} and ok.all()
        assert torch.equal(pixels, eval_transform_uint8_batch(paths))


def test_turbo_gives_pils_pixels_where_the_decoders_agree(files):
    """TurboJPEG (simplejpeg) decodes the RGB and grayscale JPEGs, PIL the CMYK JPEG and the PNGs;
    with and without worker processes and slots (where each JPEG is decoded in its place)."""
    from unicom.data import jpeg
    from unicom.transforms import to_rgb

    assert jpeg.agrees_with_pil()  # the check at start, on this machine's two builds
    for path in files:
        data = Path(path).read_bytes()
        mode = Image.open(path).mode
        if mode == "CMYK" or not path.endswith(".jpg"):
            assert jpeg.header(data) is None
            continue
        assert jpeg.header(data) == Image.open(path).size[::-1]
        assert np.array_equal(jpeg.decode(data), np.array(to_rgb(Image.open(path)))), path
    for workers, use_slots, kind in ((0, None, "PaddedGroups"), (2, False, "PaddedGroups"), (2, None, "PackedImages")):
        kinds, pixels, ok, _ = _loader_batches(files, "turbo", use_slots=use_slots, workers=workers)
        assert kinds == {kind} and ok.all()
        assert torch.equal(pixels, eval_transform_uint8_batch(files))


def test_turbo_probes_cover_every_subsampling():
    from unicom.data import jpeg

    import simplejpeg

    kinds = {simplejpeg.decode_jpeg_header(data)[2:] for data in jpeg._probes()}
    assert {("YCbCr", s) for s in ("444", "422", "420", "440", "411")} | {("Gray", "Gray")} <= kinds


def test_turbo_hands_damaged_jpegs_to_pil(files, tmp_path):
    """A JPEG whose header reads but whose scan is damaged: TurboJPEG (strict) refuses it, PIL
    decides (here it decodes what it can, so the pipeline gives PIL's pixels) also in the slot,
    where the image's place was laid out from its header."""
    data = bytearray(Path(files[2]).read_bytes())  # 400x300
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(range(64))  # garbage inside the entropy-coded scan
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(bytes(data))
    from unicom.data import jpeg

    assert jpeg.header(bytes(data)) == (300, 400) and jpeg.decode(bytes(data)) is None
    Image.open(damaged).load()  # PIL accepts it
    paths = [files[0], str(damaged), files[1], str(damaged)]
    for use_slots in (True, False):
        kinds, pixels, ok, _ = _loader_batches(paths, "turbo", use_slots=use_slots)
        assert ok.all() and torch.equal(pixels, eval_transform_uint8_batch(paths))

    # A progressive JPEG whose third scan header is broken: its header reads, both decoders fail.
    buffer = io.BytesIO()
    Image.open(files[2]).save(buffer, "JPEG", quality=90, progressive=True)
    data = bytearray(buffer.getvalue())
    scans = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    data[scans[2] + 4] = 9  # its component count
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(bytes(data))
    assert jpeg.header(bytes(data)) == (300, 400)
    paths = [files[0], str(broken), files[1], files[3]]
    for use_slots in (True, False):
        with pytest.raises(BadImageError, match="broken.jpg"):
            _loader_batches(paths, "turbo", use_slots=use_slots)
        kinds, pixels, ok, _ = _loader_batches(paths, "turbo", use_slots=use_slots, skip_bad_images=True)
        assert ok.tolist() == [True, False, True, True]
        assert torch.equal(pixels[ok], eval_transform_uint8_batch([files[0], files[1], files[3]]))


@pytest.mark.parametrize("decode", ["turbo", "tv-decode", "tv", "device-decode"])
def test_other_decoders_leave_decompression_bombs_to_pil(files, monkeypatch, decode):
    """Images over PIL's pixel limit go to PIL, which refuses them (over twice the limit) as it
    does for every pipeline, instead of another decoder allocating whatever a header claims."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 5000)  # 160x120 = 19,200 pixels: refused
    for use_slots, workers in ((None, 0), (True, 2)):
        with pytest.raises(BadImageError, match="DecompressionBomb"):
            _loader_batches(files[:1], decode, use_slots=use_slots, workers=workers)


def _headers_pil_refuses(path: str) -> dict[str, bytes]:
    """A good JPEG with header damage libjpeg-turbo skips over but PIL's marker parser refuses."""
    good = Path(path).read_bytes()
    return {
        "tem": good[:2] + b"\xff\x01" + good[2:],  # a TEM marker (no length) after SOI
        "short_jfif": good[:2] + b"\xff\xe0\x00\x07JFIF\x00" + good[2:],  # APP0 too short for JFIF
        "short_icc": good[:2] + b"\xff\xe2\x00\x0eICC_PROFILE\x00" + good[2:],  # ICC chunk without its numbers
    }


@pytest.mark.parametrize("decode", ["turbo", "tv-decode", "tv", "device-decode"])
def test_other_decoders_fail_or_skip_what_pil_refuses_to_open(files, tmp_path, decode):
    """libjpeg-turbo decodes these; the published path (PIL) refuses them: every pipeline must
    too (an error, or ok False when skipping bad images), never embed them."""
    from unicom.data import jpeg

    refused = []
    for name, data in _headers_pil_refuses(files[2]).items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        assert jpeg.decode(data) is not None and not jpeg.pil_opens(data)
        with pytest.raises(BadImageError):
            ImageDataset([str(path)], [0], eval_transform(48))[0]  # the published path
        refused.append(str(path))
    assert jpeg.pil_opens(Path(files[2]).read_bytes())
    paths = [files[0], *refused, files[1], files[3]]
    # turbo's workers lay the batch out in a slot from the headers first: both ways there (the gate is shared).
    for use_slots, workers in ((None, 0), (True, 2)) if decode == "turbo" else ((None, 0),):
        with pytest.raises(BadImageError, match="tem.jpg"):
            _loader_batches(paths, decode, use_slots=use_slots, workers=workers)
        _, pixels, ok, _ = _loader_batches(paths, decode, use_slots=use_slots, workers=workers, skip_bad_images=True)
        assert ok.tolist() == [True, False, False, False, True, True]
        if decode != "tv":  # tv resizes its own way
            assert torch.equal(pixels[ok], eval_transform_uint8_batch([files[0], files[1], files[3]]))


def test_jpeg_dimensions_from_the_frame_header(files, tmp_path):
    from unicom.data import jpeg

    progressive = tmp_path / "progressive.jpg"
    Image.open(files[2]).save(progressive, quality=80, progressive=True)
    for path in [p for p in files if p.endswith(".jpg")] + [str(progressive)]:
        assert jpeg.dimensions(Path(path).read_bytes()) == Image.open(path).size[::-1], path  # RGB, L, CMYK
    assert jpeg.dimensions(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before the frame header
    assert jpeg.dimensions(b"\xff\xd8garbage") is None
    assert jpeg.dimensions(b"\xff\xd8\xff\xc0\x00\x11\x08\x01") is None  # cut inside the header


def test_turbo_without_simplejpeg_says_how_to_install(monkeypatch, capsys):
    from unicom.programs.retrieval import main

    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import simplejpeg now raises ImportError
    with pytest.raises(ImportError, match="pip install simplejpeg"):
        InputPipeline("turbo")
    with pytest.raises(SystemExit) as exit_info:  # the programs refuse the flag before loading anything
        main(["--eval", "--dataset", "digits", "--model_name", "ViT-B/32", "--decode", "turbo"])
    assert exit_info.value.code == 2 and "turbo needs the simplejpeg package" in capsys.readouterr().err


def test_turbo_decodes_with_pil_when_the_probe_disagrees(files, monkeypatch, caplog):
    """If this process's TurboJPEG and PIL disagree on a probe, PIL decodes (a warning, exact pixels)."""
    from unicom.data import jpeg

    real = jpeg.decode
    monkeypatch.setattr(jpeg, "decode", lambda data, out=None: real(data) // 2)  # a build that disagrees
    jpeg.agrees_with_pil.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="unicom.data.jpeg"):
            assert not jpeg.agrees_with_pil()
        assert "decodes with PIL instead" in caplog.text
        dataset = ImageDataset(files, list(range(len(files))), eval_transform(48))
        assert not InputPipeline("turbo", n_px=48).dataset(dataset)._turbo
        kinds, pixels, ok, _ = _loader_batches(files, "turbo", use_slots=None, workers=0)
        assert ok.all() and torch.equal(pixels, eval_transform_uint8_batch(files))
    finally:
        jpeg.agrees_with_pil.cache_clear()


@pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning")
def test_retrieval_program_compiled_model(checkpoint, tmp_path):
    """--compile (torch.compile through load()) embeds as the eager model does (inductor on the CPU)."""
    from unicom.programs.retrieval import main

    written = synth.make_cub(tmp_path / "data", num_classes=6, per_class=3)
    records = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flags else "eager")
        argv = ["--eval", "--dataset", "cub", "--data-root", str(written.root), "--model_name", checkpoint,
                "--output", str(out), "--num_workers", "0", "--batch_size", "8", "--device", "cpu", *flags]
        assert main(argv) == 0
        records[bool(flags)] = json.loads((out / "results.json").read_text())
    keys = ("recall", "map_at_r", "r_precision", "num_query")
    assert {k: records[True][k] for k in keys} == {k: records[False][k] for k in keys}
