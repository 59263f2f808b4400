import inspect
import json

import pytest
import torch

import unicom
from unicom import model as model_module
from unicom.model import DropPath, ViTConfig


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"])
def test_state_dict_matches_published_manifest(name, fixtures_dir):
    manifest = json.loads((fixtures_dir / "reference_state_dict_manifest.json").read_text())[name]
    with torch.device("meta"):
        model = unicom.create_model(name)
    keys_shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert keys_shapes == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_available_models_in_release_order():
    assert unicom.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    io = torch.load(fixtures_dir / "tiny_reference_io.pt", weights_only=True)
    state_dict = torch.load(fixtures_dir / "tiny_reference_fp16.pt", weights_only=True)
    model = unicom.VisionTransformer(**io["config"]).eval()
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model, io


def test_tiny_reference_parity_float32(tiny):
    model, io = tiny
    with torch.no_grad():
        x = io["input"].float()
        assert rel(model(x), io["embedding"]) < 1e-5
        assert rel(model.forward_features(x), io["forward_features"]) < 1e-5


def test_tiny_reference_parity_float64(tiny):
    model, io = tiny
    model64 = unicom.VisionTransformer(**io["config"]).eval().double()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel(model64(io["input"]), io["embedding"]) < 1e-9


def test_modules_have_no_device_or_precision_logic():
    source = inspect.getsource(model_module)
    for forbidden in ("autocast", ".cuda(", ".half(", "device="):
        assert forbidden not in source


def test_wrong_input_size_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="expected images of 64x64"):
        model(torch.zeros(1, 3, 32, 32))


def test_gradient_checkpointing_gives_same_output_and_grads(tiny):
    model, io = tiny
    x = io["input"][:2].float()
    results = []
    for enable in (False, True):
        m = unicom.VisionTransformer(**io["config"])
        m.load_state_dict(model.state_dict())
        m.train().set_grad_checkpointing(enable)
        out = m(x)
        out.square().sum().backward()
        results.append((out.detach(), m.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_drop_path_rises_linearly_and_only_in_training():
    m = unicom.VisionTransformer(input_size=32, patch_size=16, dim=64, embedding_size=16, depth=3, num_heads=1,
                                 drop_path_rate=0.5)
    assert [b.drop_path.p for b in m.blocks] == [0.0, 0.25, 0.5]
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    first = m.forward_features(x)
    assert not torch.equal(first, m.forward_features(x))  # new masks each call
    torch.manual_seed(0)
    assert torch.equal(first, m.forward_features(x))  # and the global seed decides them


def test_drop_path_in_training_drops_whole_samples_and_rescales_by_one_over_keep():
    """Each sample is either 0 or x / keep exactly (brute force, no RNG assumed), with
    P(keep) = 1 - p, so the expectation over samples is x itself."""
    p, keep = 0.3, 0.7
    drop = DropPath(p).train()
    base = torch.rand(1, 3, 4, dtype=torch.float64) + 0.5  # no zeros: a dropped sample is all zeros
    x = base.expand(20000, 3, 4)
    torch.manual_seed(0)
    out = drop(x)
    kept = out.flatten(1).ne(0).any(dim=1)  # (B,)
    torch.testing.assert_close(out, torch.where(kept[:, None, None], x / keep, torch.zeros_like(x)), rtol=0, atol=0)
    # kept ~ Binomial(20000, 0.7): sd 65. Without the rescale the mean would be 0.7 x.
    assert abs(kept.sum().item() - 20000 * keep) < 400
    torch.testing.assert_close(out.mean(dim=0, keepdim=True), base, rtol=0.03, atol=0)
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)
    assert drop.eval()(x) is x and DropPath(0.0).train()(x) is x


def test_block_in_training_drops_each_residual_branch_on_its_own():
    """Brute force: every sample of a block's output is one of the four outcomes
    (attention branch kept or not) x (MLP branch kept or not), each kept branch scaled by 1/keep,
    and over many samples all four occur about as often as their probabilities say."""
    from unicom.model import Block

    torch.manual_seed(0)
    p, keep = 0.4, 0.6
    block = Block(dim=8, num_heads=2, mlp_ratio=2.0, drop_path=p).double()
    x = torch.randn(400, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        out = block.train()(x)
        block.eval()
        attn = block.attn(block.norm1(x))
        outcomes = []
        for m_attn in (0.0, 1.0):
            x1 = x + m_attn * attn / keep
            for m_mlp in (0.0, 1.0):
                outcomes.append(x1 + m_mlp * block.mlp(block.norm2(x1)) / keep)
    close = torch.stack([(out - o).flatten(1).abs().amax(dim=1) < 1e-12 for o in outcomes], dim=1)  # (B, 4)
    assert (close.sum(dim=1) == 1).all(), "each sample is exactly one outcome"
    counts = close.sum(dim=0).double()
    expected = 400 * torch.tensor([p * p, p * keep, keep * p, keep * keep], dtype=torch.float64)
    assert ((counts - expected).abs() < 5 * (expected * (1 - expected / 400)).sqrt() + 1).all(), counts


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(input_size=100, patch_size=32)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(dim=100, num_heads=12)


def test_create_model_overrides_and_unknown_name():
    with torch.device("meta"):
        m = unicom.create_model("ViT-B/32", drop_path_rate=0.1)
    assert m.blocks[-1].drop_path.p == pytest.approx(0.1)
    with pytest.raises(ValueError) as e:
        unicom.create_model("ViT-B/33")
    assert "ViT-B/32" in str(e.value) and "Did you mean 'ViT-B/32'" in str(e.value)


def test_one_image_without_its_batch_dimension_is_a_clear_error():
    model = unicom.VisionTransformer(input_size=16, patch_size=16, dim=64, embedding_size=8, depth=1, num_heads=1)
    with pytest.raises(ValueError, match="add a batch dimension"):
        model(torch.zeros(3, 16, 16))  # input_size == patch_size: this used to return a (64, 8) tensor


def test_a_state_dict_with_an_uneven_mlp_width_loads(tmp_path):
    """hidden / dim * dim can round below hidden (120 / 88 * 88 = 119.99...)."""
    from unicom.checkpoint import config_from_state_dict

    model = unicom.VisionTransformer(input_size=32, patch_size=16, dim=88, embedding_size=8, depth=1, num_heads=1,
                                     mlp_ratio=(120 + 0.5) / 88)
    assert model.blocks[0].mlp.fc1.out_features == 120
    config = config_from_state_dict(model.state_dict())
    assert unicom.VisionTransformer.from_config(config).blocks[0].mlp.fc1.out_features == 120
    with torch.no_grad():  # non-trivial normalisation statistics, so every tensor shows in the output
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded, _ = unicom.load(tmp_path / "m.pt", device="cpu")
    assert loaded.blocks[0].mlp.fc1.out_features == 120
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
