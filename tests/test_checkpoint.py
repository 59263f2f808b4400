"""Loading local checkpoints with unicom.load: formats, safety, errors."""

import pickle
import zipfile

import pytest
import torch

import unicom
from unicom.checkpoint import CheckpointError, config_from_state_dict, read_checkpoint, save_model

SMALL = dict(input_size=32, patch_size=16, dim=128, embedding_size=24, depth=2, num_heads=2)


def small_model(**overrides) -> unicom.VisionTransformer:
    torch.manual_seed(0)
    model = unicom.VisionTransformer(**{**SMALL, **overrides})
    for bn in (model.feature[1], model.feature[3]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def embed(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_published_format_fp16_state_dict_gets_config_from_shapes(tmp_path, x):
    model = small_model()
    path = tmp_path / "FP16-small.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    loaded, transform = unicom.load(path, device="cpu")
    assert loaded.config == model.config  # heads = 128 / 64 = 2
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    reference = small_model()
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(embed(loaded, x), embed(reference.eval(), x))
    assert transform.transforms[1].size == 32


def test_config_from_state_dict_for_every_published_model():
    for name in unicom.available_models():
        with torch.device("meta"):
            model = unicom.create_model(name)
        assert config_from_state_dict(model.state_dict()) == model.config


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_model_records_config_and_roundtrips(tmp_path, x, suffix):
    # 4 heads of 32 dims: only the recorded config can say so, the shapes would give 2.
    model = small_model(num_heads=4, mlp_ratio=2.0)
    path = tmp_path / f"model{suffix}"
    save_model(model, path)
    loaded, _ = unicom.load(str(path), device="cpu")
    assert loaded.config == model.config
    torch.testing.assert_close(embed(loaded, x), embed(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_and_training_checkpoint_layout(tmp_path, x, prefix):
    """DDP (module.), torch.compile (_orig_mod., as torch.compile(model).state_dict() names them)
    and both nested either way."""
    model = small_model()
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "model": {f"{prefix}{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, _ = unicom.load(path, device="cpu")
    torch.testing.assert_close(embed(loaded, x), embed(model, x), rtol=0, atol=0)


class _Print:
    def __reduce__(self):
        return (print, ("pickled code ran",))


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the malicious file is protocol 4
def test_pickled_code_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        unicom.load(path, device="cpu")
    assert not (tmp_path / "EXPLOITED").exists()
    # A raw pickle that is not a torch file at all is refused the same way.
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint: a Python pickle"):
        read_checkpoint(raw)
    builtin = tmp_path / "builtin.pt"
    torch.save({"pos_embed": torch.zeros(1), "payload": _Print()}, builtin)
    with pytest.raises(CheckpointError, match="unsafe") as error:
        read_checkpoint(builtin)
    assert "\n" not in str(error.value) and "builtin.pt" in str(error.value)
    assert not (tmp_path / "EXPLOITED").exists()


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path):
    model = small_model()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        unicom.load(truncated, device="cpu")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="safetensors"):
        unicom.load(bad_st, device="cpu")
    assert zipfile.is_zipfile(good)


def _flip_tensor_bytes(path, out):
    """A copy of the zip checkpoint ``path`` with 16 bytes inside its first tensor record changed."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    offset = info.header_offset  # the local header: 30 bytes, then its own name and extra field, then the data
    start = offset + 30 + int.from_bytes(data[offset + 26:offset + 28], "little") + \
        int.from_bytes(data[offset + 28:offset + 30], "little")
    data[start + 8:start + 24] = bytes(255 - b for b in data[start + 8:start + 24])
    out.write_bytes(bytes(data))


def test_flipped_bytes_inside_a_tensor_are_caught(tmp_path, x):
    """torch.load does not check the records' CRC-32: a file given by path is checked first."""
    good = tmp_path / "good.pt"
    save_model(small_model(), good)
    bad = tmp_path / "bad.pt"
    _flip_tensor_bytes(good, bad)
    with pytest.raises(CheckpointError, match="CRC-32"):
        unicom.load(bad, device="cpu")
    unicom.load(good, device="cpu")
    state_dict, _ = read_checkpoint(bad, verify=False)  # what the check prevents: other weights, no error
    assert any(not torch.equal(v, small_model().state_dict()[k]) for k, v in state_dict.items())


def test_files_that_are_not_checkpoints_say_so(tmp_path):
    cases = {
        "page.pt": (b"<!DOCTYPE html><html>Not Found</html>", "not a PyTorch checkpoint"),
        "lfs.pt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64, "Git LFS pointer"),
    }
    good = tmp_path / "good.pt"
    torch.save(small_model().state_dict(), good)
    cases["cut.pt"] = (good.read_bytes()[:4000], "cut short")  # the zip's directory is at the end
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            unicom.load(tmp_path / name, device="cpu")


def test_recorded_configs_that_are_not_a_models_are_clear_errors(tmp_path):
    state_dict = small_model().state_dict()
    torch.save({"config": {"lr": 0.1, "epochs": 3}, "state_dict": state_dict}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a VisionTransformer's .*lr"):
        unicom.load(tmp_path / "foreign.pt", device="cpu")
    torch.save({"config": {**SMALL, "num_heads": 3}, "state_dict": state_dict}, tmp_path / "impossible.pt")
    with pytest.raises(CheckpointError, match="not divisible"):
        unicom.load(tmp_path / "impossible.pt", device="cpu")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "m.safetensors",
              metadata={"unicom_config": "{not json"})
    with pytest.raises(CheckpointError, match="not a VisionTransformer's"):
        unicom.load(tmp_path / "m.safetensors", device="cpu")


def test_a_width_that_is_not_a_multiple_of_64_warns_about_the_head_count(tmp_path, caplog):
    torch.save(small_model(dim=96, num_heads=4).state_dict(), tmp_path / "w96.pt")
    with caplog.at_level("WARNING", logger="unicom.checkpoint"):
        model, _ = unicom.load(tmp_path / "w96.pt", device="cpu")
    assert model.config.num_heads == 1 and "not a multiple of 64" in caplog.text
    caplog.clear()
    torch.save(small_model().state_dict(), tmp_path / "w128.pt")  # 2 heads of 64: no warning
    with caplog.at_level("WARNING", logger="unicom.checkpoint"):
        unicom.load(tmp_path / "w128.pt", device="cpu")
    assert caplog.text == ""


def test_wrong_architecture_and_non_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="state dict"):
        unicom.load(path, device="cpu")
    partial = tmp_path / "partial.pt"
    sd = small_model().state_dict()
    sd.pop("norm.weight")
    torch.save(sd, partial)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        unicom.load(partial, device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a UNICOM"):
        unicom.load(foreign, device="cpu")


def test_unknown_name_lists_models_and_closest(tmp_path):
    with pytest.raises(ValueError) as e:
        unicom.load("vit-l/14@336", device="cpu")
    message = str(e.value)
    assert all(name in message for name in unicom.available_models())
    assert "Did you mean 'ViT-L/14@336px'" in message
    with pytest.raises(IsADirectoryError):
        unicom.load(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="empty string"):  # not ". is a directory"
        unicom.load("", device="cpu")


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                             (torch.float32, torch.float32)])
def test_precision_option(tmp_path, precision, dtype, x):
    path = tmp_path / "m.pt"
    save_model(small_model(), path)
    model, _ = unicom.load(path, device="cpu", precision=precision)
    assert all(p.dtype == dtype for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        unicom.load(path, device="cpu", precision="fp8")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_model(small_model(), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_model(small_model(depth=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ---- integrity: damage is an error (or, where it cannot be checked, a warning), never other weights


def _flip(data: bytes, i: int, bit: int = 0) -> bytes:
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]


def test_safetensors_written_by_save_model_are_checked(tmp_path, x):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_model(small_model(), path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for i in (header + 5, len(data) // 2, len(data) - 3):  # inside the first, a middle and the last tensor
        (tmp_path / "bad.safetensors").write_bytes(_flip(data, i, 3))
        with pytest.raises(CheckpointError, match=r"bad\.safetensors is damaged .*SHA-256"):
            unicom.load(tmp_path / "bad.safetensors", device="cpu")
    # A config digit changed in the header (num_heads 2 -> 3 is one bit) is damage too, not another model.
    at = data.index(b'num_heads\\": 2') + len(b'num_heads\\": ')  # the config is JSON text inside JSON
    (tmp_path / "cfg.safetensors").write_bytes(_flip(data, at, 0))
    with pytest.raises(CheckpointError, match="SHA-256"):
        unicom.load(tmp_path / "cfg.safetensors", device="cpu")
    # A foreign file without the record loads as before.
    save_file({k: v.contiguous() for k, v in small_model().state_dict().items()}, tmp_path / "foreign.safetensors")
    loaded, _ = unicom.load(tmp_path / "foreign.safetensors", device="cpu")
    torch.testing.assert_close(embed(loaded, x), embed(small_model(), x), rtol=0, atol=0)


def test_legacy_files_load_with_a_warning_that_they_cannot_be_checked(tmp_path, x, caplog):
    path = tmp_path / "legacy.pt"
    torch.save(small_model().state_dict(), path, _use_new_zipfile_serialization=False)
    with caplog.at_level("WARNING", logger="unicom.checkpoint"):
        loaded, _ = unicom.load(path, device="cpu")
    assert "legacy (non-zip) format" in caplog.text and "cannot be detected" in caplog.text
    torch.testing.assert_close(embed(loaded, x), embed(small_model(), x), rtol=0, atol=0)


def _read_outcome(path):
    """'ok' or 'error', and the error must be a one-line CheckpointError naming the file."""
    try:
        read_checkpoint(path)
    except CheckpointError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        assert "arbitrary code" not in message, message  # damage is not reported as a security problem
        return "error"
    return "ok"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # a flipped protocol byte
def test_every_damaged_legacy_header_is_a_checkpoint_error(tmp_path, caplog):
    """Flipped bits across the pickles of a legacy file: unpickler failures of every kind (IndexError,
    UnicodeDecodeError, AssertionError, ...) are one-line CheckpointErrors, never tracebacks."""
    data_path = tmp_path / "legacy.pt"
    torch.save({"config": small_model().config.to_dict(), "state_dict": small_model(depth=1).state_dict()},
               data_path, _use_new_zipfile_serialization=False)
    data = data_path.read_bytes()
    path = tmp_path / "m.pt"
    outcomes = []
    for i in range(0, 3000, 5):
        path.write_bytes(_flip(data, i, i % 8))
        outcomes.append(_read_outcome(path))
    assert outcomes.count("error") > 100
    for content in (b"\x80", data[:1], data[: len(data) // 2]):
        path.write_bytes(content)
        assert _read_outcome(path) == "error"


@pytest.mark.parametrize("prefix", [b"\x00", b"X" * 7, bytes(512)])
def test_a_zip_with_bytes_in_front_is_damaged_not_unsafe(tmp_path, prefix):
    good = tmp_path / "good.pt"
    save_model(small_model(), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(prefix + good.read_bytes())
    with pytest.raises(CheckpointError, match=r"bad\.pt is damaged .*bytes in front"):
        unicom.load(bad, device="cpu")


@pytest.mark.parametrize("field,value", [("num_heads", 0), ("patch_size", 0), ("dim", -64), ("depth", 0),
                                         ("num_heads", "2"), ("mlp_ratio", float("nan")), ("drop_path_rate", 1.5)])
def test_recorded_configs_with_impossible_numbers_are_checkpoint_errors(tmp_path, field, value):
    path = tmp_path / "odd.pt"
    torch.save({"config": {**small_model().config.to_dict(), field: value}, "state_dict": small_model().state_dict()},
               path)
    with pytest.raises(CheckpointError, match=f"odd.pt records a config .*{field}"):
        unicom.load(path, device="cpu")


def test_state_dicts_of_other_shapes_are_checkpoint_errors_naming_the_file(tmp_path):
    sd = small_model().state_dict()
    for name, change in {"rank": ("patch_embed.proj.weight", torch.zeros(3)),
                         "names": ("blocks.x.weight", torch.zeros(1))}.items():
        path = tmp_path / f"{name}.pt"
        torch.save({**sd, change[0]: change[1]}, path)
        with pytest.raises(CheckpointError) as error:
            unicom.load(path, device="cpu")
        assert str(path) in str(error.value) and "\n" not in str(error.value)
