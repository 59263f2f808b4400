"""``turbo`` (``unicom.data._pipelines.turbo``) and its TurboJPEG gate (``.jpeg``): PIL's pixels
where the two libjpeg-turbo builds agree, and PIL's verdict on every file it would refuse."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_files import files_fixture, loader_batches, photos_fixture, uint8_batch  # noqa: E402, F401

from unicom.data import BadImageError, ImageDataset  # noqa: E402
from unicom.data._pipelines import jpeg, make_pipeline  # noqa: E402
from unicom.transforms import eval_transform, to_rgb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_turbo_gives_pils_pixels_where_the_decoders_agree(files):
    """TurboJPEG (simplejpeg) decodes the RGB and grayscale JPEGs, PIL the CMYK JPEG and the PNGs;
    with and without worker processes and slots (each JPEG is decoded in its place)."""
    assert jpeg.agrees_with_pil()  # the check at start, on this machine's two builds
    for path in files:
        data = Path(path).read_bytes()
        mode = Image.open(path).mode
        if mode == "CMYK" or not path.endswith(".jpg"):
            assert jpeg.header(data) is None
            continue
        assert jpeg.header(data) == Image.open(path).size[::-1]
        assert np.array_equal(jpeg.decode(data), np.array(to_rgb(Image.open(path)))), path
    for workers, use_slots, in_slot in ((0, None, False), (2, False, False), (2, None, True)):
        kinds, pixels, ok, _ = loader_batches(files, "turbo", use_slots=use_slots, workers=workers)
        assert kinds == {("WholeImages", in_slot)} and ok.all()
        assert torch.equal(pixels, uint8_batch(files))


def test_turbo_probes_cover_every_subsampling():
    import simplejpeg

    kinds = {simplejpeg.decode_jpeg_header(data)[2:] for data in jpeg.probe_images()}
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
    assert jpeg.header(bytes(data)) == (300, 400) and jpeg.decode(bytes(data)) is None
    Image.open(damaged).load()  # PIL accepts it
    paths = [files[0], str(damaged), files[1], str(damaged)]
    for use_slots in (True, False):
        kinds, pixels, ok, _ = loader_batches(paths, "turbo", use_slots=use_slots)
        assert ok.all() and torch.equal(pixels, uint8_batch(paths))

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
            loader_batches(paths, "turbo", use_slots=use_slots)
        kinds, pixels, ok, _ = loader_batches(paths, "turbo", use_slots=use_slots, skip_bad_images=True)
        assert ok.tolist() == [True, False, True, True]
        assert torch.equal(pixels[ok], uint8_batch([files[0], files[1], files[3]]))


def test_turbo_leaves_decompression_bombs_to_pil(files, monkeypatch):
    """Images over PIL's pixel limit go to PIL, which refuses them (over twice the limit) as it
    does for every pipeline, instead of another decoder allocating whatever a header claims."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 160x120 = 19,200 pixels: refused
    for use_slots, workers in ((None, 0), (True, 2)):
        with pytest.raises(BadImageError, match="DecompressionBomb"):
            loader_batches(files[:1], "turbo", use_slots=use_slots, workers=workers)


def _headers_pil_refuses(path: str) -> dict[str, bytes]:
    """A good JPEG with header damage libjpeg-turbo skips over but PIL's marker parser refuses."""
    good = Path(path).read_bytes()
    return {
        "tem": good[:2] + b"\xff\x01" + good[2:],  # a TEM marker (no length) after SOI
        "short_jfif": good[:2] + b"\xff\xe0\x00\x07JFIF\x00" + good[2:],  # APP0 too short for JFIF
        "short_icc": good[:2] + b"\xff\xe2\x00\x0eICC_PROFILE\x00" + good[2:],  # ICC chunk without its numbers
    }


def test_turbo_fails_or_skips_what_pil_refuses_to_open(files, tmp_path):
    """libjpeg-turbo decodes these; the published path (PIL) refuses them: turbo must too (an
    error, or ok False when skipping bad images), never embed them."""
    refused = []
    for name, data in _headers_pil_refuses(files[2]).items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        assert jpeg.decode(data) is not None and not jpeg.pil_opens(data) and jpeg.read(str(path)) is None
        with pytest.raises(BadImageError):
            ImageDataset([str(path)], [0], eval_transform(48))[0]  # the published path
        refused.append(str(path))
    assert jpeg.pil_opens(Path(files[2]).read_bytes())
    paths = [files[0], *refused, files[1], files[3]]
    # The workers lay the batch out in a slot from the headers first: both ways (the gate is shared).
    for use_slots, workers in ((None, 0), (True, 2)):
        with pytest.raises(BadImageError, match="tem.jpg"):
            loader_batches(paths, "turbo", use_slots=use_slots, workers=workers)
        _, pixels, ok, _ = loader_batches(paths, "turbo", use_slots=use_slots, workers=workers, skip_bad_images=True)
        assert ok.tolist() == [True, False, False, False, True, True]
        assert torch.equal(pixels[ok], uint8_batch([files[0], files[1], files[3]]))


def test_jpeg_dimensions_from_the_frame_header(files, tmp_path):
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
        make_pipeline("turbo")
    with pytest.raises(SystemExit) as exit_info:  # the programs refuse the flag before loading anything
        main(["--eval", "--dataset", "digits", "--model_name", "ViT-B/32", "--decode", "turbo"])
    assert exit_info.value.code == 2 and "turbo needs the simplejpeg package" in capsys.readouterr().err


def test_turbo_decodes_with_pil_when_the_probe_disagrees(files, monkeypatch, caplog):
    """If this process's TurboJPEG and PIL disagree on a probe, PIL decodes (a warning, exact pixels)."""
    real = jpeg.decode
    monkeypatch.setattr(jpeg, "decode", lambda data, out=None: real(data) // 2)  # a build that disagrees
    jpeg.agrees_with_pil.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="unicom.data._pipelines.jpeg"):
            assert not jpeg.agrees_with_pil()
        assert "decodes with PIL instead" in caplog.text
        assert not make_pipeline("turbo", n_px=48).agrees
        kinds, pixels, ok, _ = loader_batches(files, "turbo", use_slots=None, workers=0)
        assert ok.all() and torch.equal(pixels, uint8_batch(files))
    finally:
        jpeg.agrees_with_pil.cache_clear()
