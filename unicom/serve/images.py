"""Uploaded images and thumbnails: decoding what a client sends, and small cached JPEGs."""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict

from PIL import Image, ImageOps, UnidentifiedImageError

from ..transforms import to_rgb

__all__ = ["NotAnImage", "ThumbnailCache", "decode_upload"]


class NotAnImage(ValueError):
    """The bytes are not an image Pillow can decode."""


def decode_upload(data: bytes) -> Image.Image:
    """The image in ``data``, fully decoded, or :class:`NotAnImage` saying why not.

    The pixels are decoded here (``load()``), so a truncated or corrupt file fails now, in its
    own request, and never later inside a batch with other clients' queries. An image above
    Pillow's decompression-bomb limit is refused rather than decoded.
    """
    if not data:
        raise NotAnImage("the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise NotAnImage("not an image: no format Pillow reads starts like these bytes") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for damaged files
        reason = str(error) or type(error).__name__
        raise NotAnImage(f"not an image Pillow can decode ({reason})") from None
    return image


def thumbnail_jpeg(data: bytes, size: int, quality: int = 85) -> bytes:
    """A JPEG of the image in ``data``, at most ``size`` pixels on its longer side, upright
    (EXIF orientation applied: it is for looking at, not for embedding)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for photos
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")  # transparent areas on white, as a browser shows them
            image = Image.new("RGB", rgba.size, "white")
            image.paste(rgba, mask=rgba.getchannel("A"))
        image = to_rgb(image)  # 16-bit and float images scaled, not clipped
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality, optimize=True)
        return out.getvalue()


class ThumbnailCache:
    """Thumbnails kept in memory, least recently used first out when ``max_bytes`` is reached.

    Entries are keyed by the source's identity (the item's id and its file's size and
    modification time), so a file replaced on disk gets a new thumbnail. Nothing is written to
    the collection (the service is read-only over it).
    """

    def __init__(self, size: int = 256, max_bytes: int = 64 << 20) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, source) -> tuple[bytes, str]:
        """``(jpeg_bytes, etag)`` of ``source`` (a :class:`unicom.serve.backend.ImageSource`)."""
        key = source.key
        etag = '"' + "-".join(str(part) for part in (*key, self.size)) + '"'
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return data, etag
        data = thumbnail_jpeg(source.read(), self.size)  # outside the lock: other thumbnails go on meanwhile
        with self._lock:
            self.misses += 1
            if key not in self._entries:
                self._entries[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= len(old)
        return data, etag
