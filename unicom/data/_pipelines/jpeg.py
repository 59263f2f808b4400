"""JPEG decoding with libjpeg-turbo's TurboJPEG API (the optional ``simplejpeg`` package).

The ``turbo`` pipeline decodes JPEGs here instead of through PIL: the same library
(Pillow's wheels bundle libjpeg-turbo too) with the same settings (accurate integer IDCT,
smooth chroma upsampling), called without PIL's per-file Python machinery, releasing the GIL,
and writing straight into a caller's buffer. Two builds of a library are not one definition,
so :func:`agrees_with_pil` compares the two on probe images before a pipeline relies on it.

Only YCbCr and grayscale JPEGs are decoded here (PIL's ``convert("RGB")`` of those repeats
the gray value or applies the library's YCbCr conversion, as TurboJPEG does); CMYK, YCCK and
Adobe RGB files, other formats, files whose headers PIL refuses (libjpeg-turbo is more
lenient) and anything TurboJPEG reports as damaged go to PIL, which decides as it does for
every other pipeline.
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from ..image import open_image_file

__all__ = ["agrees_with_pil", "available", "decode", "dimensions", "header", "pil_opens", "probe_images", "read",
           "require", "within_pil_limit"]

logger = logging.getLogger(__name__)

_COLORSPACES = ("YCbCr", "Gray")  # what TurboJPEG converts to RGB as PIL does


def _module() -> Any | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available() -> bool:
    """Whether ``simplejpeg`` is installed."""
    return _module() is not None


def require() -> Any:
    """The ``simplejpeg`` module, or an ImportError that says how to install it."""
    module = _module()
    if module is None:
        raise ImportError("decode='turbo' needs the simplejpeg package (libjpeg-turbo's TurboJPEG API): "
                          "pip install simplejpeg (or unicom[fast]), or choose another --decode")
    return module


_NOT_FRAMES = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC: markers in the SOFn range that are not frame headers


def dimensions(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header (SOFn), read in Python without any decoder;
    None where the markers before it are malformed."""
    i, n = 2, len(data)  # after SOI
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        elif marker == 0xDA:  # a scan before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def within_pil_limit(data: bytes) -> bool:
    """Whether a JPEG's frame header is readable and within PIL's ``Image.MAX_IMAGE_PIXELS``:
    decoders other than PIL's get only those (PIL warns about or refuses the others as
    decompression bombs, and reports malformed files)."""
    size = dimensions(data)
    return size is not None and (Image.MAX_IMAGE_PIXELS is None or size[0] * size[1] <= Image.MAX_IMAGE_PIXELS)


def pil_opens(data: bytes) -> bool:
    """Whether PIL's own marker parser accepts these JPEG bytes (``Image.open``: the headers, no
    pixels). libjpeg-turbo skips header damage that PIL
    refuses (a stray TEM marker, a short JFIF or ICC segment): other decoders get only files
    PIL opens, so such a file fails, or is skipped, as in the published path. Callers check
    :func:`within_pil_limit` first (PIL would warn about a bomb here)."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            return image.format in ("JPEG", "MPO")  # MPO: camera JPEGs with more frames; the first is decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def read(path: str) -> bytes | None:
    """The file's bytes if it is a complete JPEG (SOI marker, EOI marker near the end) with a
    frame header within PIL's pixel limit and headers PIL opens, else None (PIL's turn).

    Truncated files go to PIL, which rejects them as ``ImageDataset`` does (other decoders may
    silently decode what is there), and so do decompression bombs, which other decoders would
    allocate whatever their header claims for, and headers PIL refuses but libjpeg-turbo skips.
    """
    try:
        with open_image_file(path) as f:  # a FIFO or folder is PIL's to refuse
            data = f.read()
    except OSError:
        return None
    if data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-1024:] or not within_pil_limit(data):
        return None
    return data if pil_opens(data) else None


def header(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG this module decodes as PIL would, else None (PIL's turn).
    Callers pass bytes that :func:`read` accepted."""
    try:
        height, width, colorspace, _ = require().decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in _COLORSPACES else None


def decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray | None:
    """A JPEG's (H, W, 3) uint8 RGB pixels, written into ``out`` (C-contiguous, (H, W, 3)) when
    given; None where TurboJPEG reports any error or warning (PIL's turn)."""
    try:
        return require().decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, buffer=out, strict=True)
    except ValueError:
        return None


def probe_images() -> list[bytes]:
    """Small JPEGs as cameras, PIL and libjpeg-turbo write them: every chroma subsampling, gray,
    progressive, odd sizes (partial MCUs at the edges), low and high quality."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:45, 0:61]
    smooth = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.float64)
    pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    settings = [dict(subsampling=s, quality=q) for s in (0, 1, 2) for q in (50, 95)]
    settings += [dict(subsampling=2, quality=90, progressive=True), dict(subsampling=1, quality=80, optimize=True)]
    out = []
    for options in settings:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **options)
        out.append(buffer.getvalue())
    buffer = io.BytesIO()
    image.convert("L").save(buffer, "JPEG", quality=85)
    out.append(buffer.getvalue())
    # 4:4:0 and 4:1:1, which PIL does not write: old libjpeg-turbo builds upsample 4:4:0 differently
    out += [require().encode_jpeg(pixels, 90, "RGB", subsampling) for subsampling in ("440", "411")]
    return out


@functools.cache
def agrees_with_pil() -> bool:
    """Whether TurboJPEG gives PIL's pixels on the probe images (checked once per process);
    False, with a warning, where they differ."""
    require()
    for data in probe_images():
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(image.convert("RGB"))
        got = decode(data) if header(data) is not None else None
        if got is None or not np.array_equal(got, expected):
            logger.warning("simplejpeg's libjpeg-turbo and PIL's decoder disagree on a probe image: "
                           "decode='turbo' decodes with PIL instead (the pixels stay exact, the speed-up is lost)")
            return False
    return True
