"""The thumbnails of `unicom serve` on real files: transparent areas on white, as a browser shows
them, and the cache evicting the least recently used thumbnail first."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from unicom.serve.backend import image_source
from unicom.serve.images import ThumbnailCache, thumbnail_jpeg


def test_transparent_areas_come_out_white(tmp_path):
    out = io.BytesIO()
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # black, but fully transparent ...
    image.paste((255, 0, 0, 255), (0, 0, 20, 20))  # ... beside an opaque red half
    image.save(out, "PNG")
    with Image.open(io.BytesIO(thumbnail_jpeg(out.getvalue(), 16))) as thumb:
        pixels = np.asarray(thumb.convert("RGB"), dtype=int)
    assert thumb.size == (16, 8)
    assert (pixels[:, -3:] > 240).all()  # white where it was transparent
    assert (pixels[:, :3, 0] > 200).all() and (pixels[:, :3, 1:] < 60).all()  # red where it was opaque


def test_the_cache_evicts_the_least_recently_used(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(path)
    one = len(thumbnail_jpeg(path.read_bytes(), 16))
    cache = ThumbnailCache(size=16, max_bytes=2 * one)  # two thumbnails fit
    a, b, c = (image_source(item, str(path)) for item in (1, 2, 3))  # same file, three items
    cache.get(a)
    cache.get(b)
    cache.get(a)  # a used again: b is now the least recently used
    cache.get(c)  # evicts b, not a
    assert (cache.hits, cache.misses) == (1, 3)
    data, etag = cache.get(a)
    assert (cache.hits, cache.misses) == (2, 3) and data == thumbnail_jpeg(path.read_bytes(), 16)
    cache.get(b)
    assert (cache.hits, cache.misses) == (2, 4)
    assert etag.startswith('"1-') and etag.endswith('-16"')
