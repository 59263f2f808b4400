"""torch.hub entry points for the published UNICOM models.

    model = torch.hub.load("deepglint/unicom", "ViT_B_32")                 # published weights, eval mode, CPU
    transform = torch.hub.load("deepglint/unicom", "transform", "ViT_B_32")  # PIL image -> input tensor
    embedding = model(transform(image).unsqueeze(0))                         # (1, 512), not L2-normalised

Each model entry takes ``pretrained`` (default True: the published checkpoint, downloaded once
into ``~/.cache/unicom`` and verified; False: random weights, nothing downloaded) and passes any
other keyword to :func:`unicom.load` (``device="cuda"``, ``precision="fp16"``, ...).
"""

# torch.hub checks these before running an entry; tqdm draws the download's progress bar
# (numpy and Pillow come with torchvision).
dependencies = ["torch", "torchvision", "tqdm"]

_NAMES = {"ViT_B_32": "ViT-B/32", "ViT_B_16": "ViT-B/16", "ViT_L_14": "ViT-L/14", "ViT_L_14_336px": "ViT-L/14@336px"}


def _model(name: str, pretrained: bool, **kwargs):
    import unicom

    if pretrained:
        return unicom.load(name, **{"device": "cpu", **kwargs})[0]
    if kwargs:
        raise TypeError(f"pretrained=False takes no other arguments, got {sorted(kwargs)}")
    return unicom.create_model(name).eval()


def ViT_B_32(pretrained: bool = True, **kwargs):  # noqa: N802 - torch.hub entry names
    """UNICOM ViT-B/32 (224 px input, 512-d embedding)."""
    return _model("ViT-B/32", pretrained, **kwargs)


def ViT_B_16(pretrained: bool = True, **kwargs):  # noqa: N802
    """UNICOM ViT-B/16 (224 px input, 768-d embedding)."""
    return _model("ViT-B/16", pretrained, **kwargs)


def ViT_L_14(pretrained: bool = True, **kwargs):  # noqa: N802
    """UNICOM ViT-L/14 (224 px input, 768-d embedding)."""
    return _model("ViT-L/14", pretrained, **kwargs)


def ViT_L_14_336px(pretrained: bool = True, **kwargs):  # noqa: N802
    """UNICOM ViT-L/14@336px (336 px input, 768-d embedding)."""
    return _model("ViT-L/14@336px", pretrained, **kwargs)


def transform(name: str = "ViT_B_32"):
    """The published eval transform of a model (an entry name such as ``ViT_L_14_336px``, or a
    registry name such as ``ViT-L/14@336px``): bicubic resize of the shorter side, center crop,
    RGB tensor normalised with the CLIP mean and std."""
    import unicom._pretrained
    import unicom.transforms

    entry = unicom._pretrained.get_pretrained(_NAMES.get(name, name))
    return unicom.transforms.eval_transform(entry.input_size)
