"""Feature extraction for clustering: inputs, sources, fusion, output files, resuming, torchrun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_in_processes
from PIL import Image
from synthetic_datasets import write_tar

from unicom._pretrain.features import (
    ClipSource,
    PixelSource,
    UnicomSource,
    extract_features,
    fuse,
    load_features,
    read_manifest,
)
from unicom._pretrain.webdataset import expand_braces, iter_tar_samples, list_shards

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- writing inputs


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (20, 14), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if mode == "L":
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def sample_members(shard: int, count: int, bad: bool = True) -> list[tuple[str, bytes]]:
    """``count`` png/jpg/webp images with captions (every third has none), plus one undecodable image."""
    members = []
    fmts = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for i in range(count):
        key = f"{shard:03d}{i:04d}"
        ext, fmt = fmts[i % 3]
        members.append((f"{key}.{ext}", image_bytes(1000 * shard + i, fmt)))
        if i % 3 != 2:
            members.append((f"{key}.txt", f"a photo number {i} of shard {shard}".encode()))
        members.append((f"{key}.json", b"{}"))  # other members are ignored
    if bad:
        members.append((f"{shard:03d}bad.jpg", b"\xff\xd8 not really a jpeg"))
    return members


def write_shards(folder: Path, count: int, per_shard: int = 4) -> list[Path]:
    return [write_tar(folder / f"shard-{s:03d}.tar", sample_members(s, per_shard)) for s in range(count)]


def pixel_reference(data: bytes, size: int) -> np.ndarray:
    """Raw pixels by hand in float64: PIL bilinear resize (what torchvision does on PIL images)."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
    chw = np.asarray(image, dtype=np.float64).transpose(2, 0, 1).reshape(-1) / 255.0
    v = chw * 2 - 1
    return v / np.linalg.norm(v)


def tar_images(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {
            m.name.rsplit(".", 1)[0]: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.name.endswith((".png", ".jpg", ".webp")) and "bad" not in m.name
        }


# ----------------------------------------------------------------------------- inputs


def test_expand_braces_and_list_shards(tmp_path: Path) -> None:
    assert expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    paths = write_shards(tmp_path / "a", 3, per_shard=1)
    by_brace = list_shards(str(tmp_path / "a" / "shard-{000..002}.tar"))
    by_glob = list_shards([str(tmp_path / "a" / "*.tar")])
    assert [s.source for s in by_brace] == [s.source for s in by_glob] == [str(p) for p in paths]
    assert [s.name for s in by_glob] == ["shard-000", "shard-001", "shard-002"]
    write_tar(tmp_path / "b" / "shard-000.tar", [])
    with pytest.raises(ValueError, match="share the name"):
        list_shards([str(paths[0]), str(tmp_path / "b" / "shard-000.tar")])
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "a" / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "a" / "shard-{000..005}.tar"))


def test_tar_samples_grouped_by_key(tmp_path: Path) -> None:
    png = image_bytes(0)
    path = write_tar(tmp_path / "x.tar", [
        ("d/k1.jpg", png), ("d/k1.txt", b" first caption \n"), ("d/k1.json", b"{}"),
        ("k2.PNG", png),  # no caption; upper-case extension
        ("k3.txt", b"caption only"),  # no image
        ("k4.webp", png), ("k4.txt", b"   "),  # blank caption counts as none
        ("._k5.jpg", b"AppleDouble"),  # macOS metadata, not a sample
        ("k6.seg.png", png), ("k6.seg.txt", "caf\u00e9".encode()),  # key up to the first dot
    ])
    samples = list(iter_tar_samples(path))
    assert [s.key for s in samples] == ["d/k1", "k2", "k3", "k4", "k6"]
    assert [s.caption for s in samples] == ["first caption", None, "caption only", None, None]
    # webdataset extensions run from the first dot: "seg.png" and "seg.txt" are neither image nor caption
    assert [s.image is not None for s in samples] == [True, True, False, True, False]


def test_pixels_from_tars_match_reference(tmp_path: Path) -> None:
    paths = write_shards(tmp_path / "in", 3, per_shard=5)
    out = tmp_path / "out"
    # two loader workers: shards are read in other processes, results still in input order
    manifest = extract_features(PixelSource(size=6), str(tmp_path / "in" / "shard-{000..002}.tar"), out,
                                batch_size=2, num_workers=2)
    assert manifest["num_samples"] == 15 and manifest["num_bad"] == 3
    assert manifest["num_without_caption"] == 0  # fusion "image": captions are not used
    assert manifest["config"] == {"source": "pixels", "size": 6, "fusion": "image", "dim": 108, "dtype": "float16"}
    features, keys = load_features(out)
    assert features.dtype == torch.float16 and features.shape == (15, 108)
    assert keys == [f"{s:03d}{i:04d}" for s in range(3) for i in range(5)]
    images = {k: v for p in paths for k, v in tar_images(p).items()}
    reference = np.stack([pixel_reference(images[k], 6) for k in keys])
    np.testing.assert_allclose(features.double().numpy(), reference, atol=2e-3, rtol=0)
    meta = json.loads((out / "meta_shard-001.json").read_text())
    assert meta["num_bad"] == 1 and meta["bad"][0][0] == "001bad" and "UnidentifiedImageError" in meta["bad"][0][1]
    assert np.load(out / "features_shard-001.npy").dtype == np.float16
    # a block of rows across a shard boundary, read through memory maps
    block, block_keys = load_features(out, rows=range(3, 12))
    assert torch.equal(block, features[3:12]) and block_keys == keys[3:12]
    none, no_keys = load_features(out, rows=range(4, 4), with_keys=False)
    assert none.shape == (0, 108) and no_keys is None


def test_folder_virtual_shards_and_rerun(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = ["b/z.png", "a/2.jpg", "a/1.png", "c.webp", "a/10.png"]
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[name.rsplit(".")[-1]]))
    (root / "a" / "2.txt").write_text("two")
    (root / "notes.txt").write_text("not a caption of anything")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    shards = list_shards(str(root), folder_shard_size=2)
    assert [s.name for s in shards] == ["images-00000", "images-00001", "images-00002"]
    out = tmp_path / "out"
    manifest = extract_features(PixelSource(size=4), root, out, batch_size=8, folder_shard_size=2)
    features, keys = load_features(out)
    assert keys == ["a/1", "a/10", "a/2", "b/z", "c"]  # sorted paths, "a/broken" skipped
    assert manifest["num_bad"] == 1 and manifest["config"]["folder_shard_size"] == 2
    for key, row in zip(keys, features):
        path = next(p for p in root.glob(key + ".*") if p.suffix != ".txt")
        np.testing.assert_allclose(row.double().numpy(), pixel_reference(path.read_bytes(), 4), atol=2e-3)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("features_*.npy")}
    extract_features(PixelSource(size=4), root, out, batch_size=8, folder_shard_size=2)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("features_*.npy")}
    assert before == after and len(after) == 3  # nothing recomputed
    with pytest.raises(ValueError, match="another configuration"):
        extract_features(PixelSource(size=5), root, out, folder_shard_size=2)
    with pytest.raises(ValueError, match="fusion must be 'image'"):
        extract_features(PixelSource(size=4), root, tmp_path / "other", fusion="mean")


def test_damaged_tar_keeps_samples_before_the_damage(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "in" / "cut.tar", sample_members(0, 6, bad=False))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short
    manifest = extract_features(PixelSource(size=4), path, tmp_path / "out")
    assert manifest["damaged_shards"] == ["cut"]
    assert 0 < manifest["num_samples"] < 6
    assert manifest["shards"][0]["read_error"]


def _tar_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("damage", ["bad checksum", "cut inside a header", "cut between members"])
def test_damaged_member_headers_are_reported_not_taken_for_the_end(tmp_path: Path, damage: str) -> None:
    """tarfile ends a stream at a damaged header after the first member as if the archive ended
    there: the samples after it would vanish unreported."""
    members = [(f"k{i}.png", image_bytes(i)) for i in range(6)]
    path = write_tar(tmp_path / "in" / "bad.tar", members)
    data, third = bytearray(path.read_bytes()), _tar_offsets(path)[3]
    if damage == "bad checksum":
        data[third + 1] ^= 0xFF  # a byte of k3's name: its header checksum fails
    else:
        data = data[:third + 100] if damage == "cut inside a header" else data[:third]
    path.write_bytes(bytes(data))
    manifest = extract_features(PixelSource(size=4), path, tmp_path / "out")
    assert manifest["damaged_shards"] == ["bad"] and "damaged tar" in manifest["shards"][0]["read_error"]
    assert manifest["num_samples"] == 2  # k0, k1; k2 was being read when the damage came: dropped
    with pytest.raises(tarfile.ReadError):
        list(iter_tar_samples(path))
    intact = write_tar(tmp_path / "in2" / "fine.tar", members)  # the end-of-archive blocks: no damage
    assert [s.key for s in iter_tar_samples(intact)] == [f"k{i}" for i in range(6)]


def test_repeated_and_non_utf8_keys_are_skipped_and_counted(tmp_path: Path) -> None:
    """Pseudo labels are looked up by key: a key that repeats an earlier sample's in the shard
    (or cannot be written to the keys file) would take another sample's label."""
    members = [("a.png", image_bytes(0)), ("b.png", image_bytes(1)), ("a.png", image_bytes(2))]
    path = write_tar(tmp_path / "in" / "s0.tar", members)
    with tarfile.open(path, "a") as tar:  # a member name that is not UTF-8 (tarfile keeps the raw bytes)
        info = tarfile.TarInfo("caf\udce9.png")
        data = image_bytes(3)
        info.size = len(data)
        tar.encoding, tar.errors = "utf-8", "surrogateescape"
        tar.addfile(info, io.BytesIO(data))
    manifest = extract_features(PixelSource(size=4), path, tmp_path / "out")
    assert manifest["num_samples"] == 2 and manifest["num_bad"] == 2
    features, keys = load_features(tmp_path / "out")
    assert keys == ["a", "b"]
    np.testing.assert_allclose(features[0].float().numpy(), pixel_reference(image_bytes(0), 4), atol=2e-3)
    meta = json.loads((tmp_path / "out" / "meta_s0.json").read_text())
    assert [reason for _, reason in meta["bad"]] == ["key repeats an earlier sample's in the shard",
                                                     "key is not valid UTF-8"]


def test_resuming_with_another_input_of_the_same_name_is_refused(tmp_path: Path) -> None:
    first = write_tar(tmp_path / "A" / "s0.tar", sample_members(0, 3, bad=False))
    second = write_tar(tmp_path / "B" / "s0.tar", sample_members(1, 3, bad=False))
    extract_features(PixelSource(size=4), first, tmp_path / "out")
    extract_features(PixelSource(size=4), first, tmp_path / "out")  # the same input: kept
    with pytest.raises(ValueError, match="holds the features of another input"):
        extract_features(PixelSource(size=4), second, tmp_path / "out")
    moved = tmp_path / "C" / "s0.tar"  # the same file elsewhere: still the same input
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    assert extract_features(PixelSource(size=4), moved, tmp_path / "out")["num_samples"] == 3


def test_fuse_reference() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=1)
    has_text = torch.tensor([True, False, True, True, False])
    rows = [0, 2, 3]
    mean = fuse(image, text, has_text, "mean")
    for j, i in enumerate(rows):
        ref = (image[i] + text[j]) / (image[i] + text[j]).norm()
        torch.testing.assert_close(mean[i], ref)
    for i in (1, 4):  # no caption: the image feature whatever the fusion
        for fusion in ("mean", "text", "image"):
            torch.testing.assert_close(fuse(image, text, has_text, fusion)[i], image[i])
    torch.testing.assert_close(fuse(image, text, has_text, "text")[rows], text)
    torch.testing.assert_close(fuse(image, text, has_text, "image"), image)
    with pytest.raises(ValueError):
        fuse(image, text[:2], has_text, "mean")


# ----------------------------------------------------------------------------- model sources


@pytest.fixture(scope="module")
def clip_source() -> ClipSource:
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    # A bundled config and tokenizer with random weights; small images and a short text
    # context keep it fast on a CPU. Never downloads (pretrained=None).
    return ClipSource.create("ViT-S-32", pretrained=None, device="cpu", force_image_size=64, force_context_length=16)


def test_clip_features_fusion_and_fallback(clip_source: ClipSource, tmp_path: Path) -> None:
    import open_clip

    members = sample_members(0, 5)  # samples 0, 1, 3, 4 have captions; 2 has none
    path = write_tar(tmp_path / "in" / "clip.tar", members)
    out = tmp_path / "mean"
    manifest = extract_features(clip_source, path, out, batch_size=3)
    assert manifest["num_without_caption"] == 1 and manifest["num_bad"] == 1
    assert manifest["config"]["fusion"] == "mean" and manifest["config"]["model"] == "ViT-S-32"
    features, keys = load_features(out)
    assert features.shape == (5, clip_source.dim)

    # reference: open_clip's own preprocess, tokenizer and encoders, fusion in float64
    model = clip_source.model
    tokenizer = open_clip.get_tokenizer("ViT-S-32", context_length=16)
    captions = {n.rsplit(".", 1)[0]: d.decode() for n, d in members if n.endswith(".txt")}
    images = tar_images(path)
    with torch.no_grad():
        pixels = torch.stack([clip_source.image_transform(Image.open(io.BytesIO(images[k])).convert("RGB"))
                              for k in keys])
        image_feats = torch.nn.functional.normalize(model.encode_image(pixels).double(), dim=-1)
        captioned = [k for k in keys if k in captions]
        text_feats = torch.nn.functional.normalize(
            model.encode_text(tokenizer([captions[k] for k in captioned])).double(), dim=-1)
    image_ref = dict(zip(keys, image_feats))
    text_ref = dict(zip(captioned, text_feats))
    assert len(captioned) == 4
    for key, row in zip(keys, features.double()):
        if key in text_ref:
            mean = image_ref[key] + text_ref[key]
            torch.testing.assert_close(row, mean / mean.norm(), atol=2e-3, rtol=0)
        else:
            torch.testing.assert_close(row, image_ref[key], atol=2e-3, rtol=0)

    with pytest.raises(ValueError, match="another configuration"):
        extract_features(clip_source, path, out, fusion="image")


def test_unicom_source_from_checkpoint(tmp_path: Path) -> None:
    from unicom.checkpoint import save_model
    from unicom.model import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(input_size=32, patch_size=16, dim=32, embedding_size=16, depth=1, num_heads=2).eval()
    save_model(model, tmp_path / "tiny.pt")
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(image_bytes(i, size=(40, 30)))
    source = UnicomSource(str(tmp_path / "tiny.pt"), device="cpu")
    assert source.dim == 16 and not source.uses_text
    extract_features(source, root, tmp_path / "out", batch_size=2)
    features, keys = load_features(tmp_path / "out")
    assert keys == ["0", "1", "2"]
    with torch.no_grad():
        batch = torch.stack([source.image_transform(Image.open(root / f"{k}.png").convert("RGB")) for k in keys])
        reference = torch.nn.functional.normalize(model(batch).double(), dim=-1)
    torch.testing.assert_close(features.double(), reference, atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------- crash and torchrun


def _program(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, str(ROOT / "extract_features.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_killed_run_resumes_without_recomputing(tmp_path: Path) -> None:
    shard_dir = tmp_path / "in"
    write_shards(shard_dir, 5, per_shard=3)
    reference = tmp_path / "reference"
    extract_features(PixelSource(size=4), str(shard_dir / "*.tar"), reference, batch_size=2)

    # Shard 3 becomes a named pipe nobody writes to: the run finishes shards 0-2, then blocks
    # reading shard 3, and is killed there (SIGKILL: no cleanup of any kind runs).
    real = (shard_dir / "shard-003.tar").read_bytes()
    (shard_dir / "shard-003.tar").unlink()
    os.mkfifo(shard_dir / "shard-003.tar")
    out = tmp_path / "out"
    argv = ["--source", "pixels", "--pixel-size", "4", "--inputs", str(shard_dir / "*.tar"), "--output", str(out),
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]
    proc = _program(argv)
    deadline = time.monotonic() + 60
    while not (out / "features_shard-002.npy").exists():
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.monotonic() < deadline, "the run did not reach shard 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = sorted(p.name for p in out.glob("features_*.npy"))
    assert done == ["features_shard-000.npy", "features_shard-001.npy", "features_shard-002.npy"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        load_features(out)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*_shard-00[012].*")}

    (shard_dir / "shard-003.tar").unlink()
    (shard_dir / "shard-003.tar").write_bytes(real)
    # the rerun: the same program, here in this process (saves starting another interpreter)
    from unicom.programs.extract_features import main

    assert main(argv) == 0
    assert stamps == {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*_shard-00[012].*")}
    features, keys = load_features(out)
    expected, expected_keys = load_features(reference)
    assert keys == expected_keys and torch.equal(features, expected)
    assert read_manifest(out)["num_bad"] == 5


def _extract_in_process(rank: int, world_size: int, inputs: str, out: str) -> dict:
    return extract_features(PixelSource(size=4), inputs, out, batch_size=2)


def test_two_processes_split_shards_and_equal_one(tmp_path: Path) -> None:
    write_shards(tmp_path / "in", 5, per_shard=3)
    inputs = str(tmp_path / "in" / "shard-{000..004}.tar")
    manifests = run_in_processes(_extract_in_process, 2, inputs, str(tmp_path / "two"), timeout_s=120)
    assert manifests[0] == manifests[1]
    ranks = [json.loads((tmp_path / "two" / f"meta_shard-{i:03d}.json").read_text())["rank"] for i in range(5)]
    assert ranks == [0, 1, 0, 1, 0]
    extract_features(PixelSource(size=4), inputs, tmp_path / "one", batch_size=2)
    two, two_keys = load_features(tmp_path / "two")
    one, one_keys = load_features(tmp_path / "one")
    assert two_keys == one_keys and torch.equal(two, one)
    assert read_manifest(tmp_path / "two") == read_manifest(tmp_path / "one")
