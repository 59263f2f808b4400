"""Input pipelines: image files to normalised batches on the device (``--decode``).

The published evaluation decodes, resizes and normalises every image in DataLoader workers
and ships float32 tensors to the model. The pipelines here split that work differently; each
``--decode`` mode is one :class:`InputPipeline` in :data:`PIPELINES`:

``exact`` (:mod:`.crops`)
    PIL decodes, resizes and crops in the workers, as published; uint8 crops travel to the
    device, which normalises them through the published ops' own table: bit-identical.
``device-resize`` (:mod:`.whole`)
    PIL decodes in the workers; the device replays Pillow's bicubic resize exactly
    (:mod:`.resample`): bit-identical, and the workers only decode. For GPUs.
``turbo`` (:mod:`.turbo`)
    As ``device-resize``, with JPEGs decoded by libjpeg-turbo's TurboJPEG API (the optional
    ``simplejpeg`` package) straight into the batch's shared memory: PIL's pixels wherever
    the two decoders agree, which is checked on probe images first.

``auto`` (:func:`resolve_decode`) is ``device-resize`` on CUDA and ``exact`` elsewhere. Every
pipeline starts from an :class:`~unicom.data.image.ImageDataset` whose transform is the
published eval (or test) transform, whose sizes :func:`pipeline_for_transform` keeps; bad
images behave as in ``ImageDataset``. Batches travel as :class:`Crops` or
:class:`WholeImages`, through a ring of reused shared-memory slots (:mod:`.slots`).
"""

from .base import InputPipeline
from .batches import Crops, WholeImages
from .crops import eval_transform_uint8
from .dataloader import LOADER_BATCH, embedding_loader, pipeline_loader
from .normalize import normalization_table, normalize_on_device
from .registry import DECODE_CHOICES, PIPELINES, make_pipeline, pipeline_for_transform, resolve_decode
from .resample import pillow_resize_crop, resized_size

__all__ = [
    "DECODE_CHOICES",
    "LOADER_BATCH",
    "PIPELINES",
    "Crops",
    "InputPipeline",
    "WholeImages",
    "embedding_loader",
    "eval_transform_uint8",
    "make_pipeline",
    "normalization_table",
    "normalize_on_device",
    "pillow_resize_crop",
    "pipeline_for_transform",
    "pipeline_loader",
    "resized_size",
    "resolve_decode",
]
