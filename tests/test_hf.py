"""``hf-hub:`` loading, ``save_pretrained``, ``push_to_hub`` and the export command, with the real
huggingface_hub client against a Hub on 127.0.0.1 (tests/fake_hf_hub.py): no network.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` once, when it is
imported (``huggingface_hub.constants``), as a user sets them before starting Python. Another
test may have imported it already, so the fixture sets the variables and reloads that module
(the import-time code runs again; a fresh process per test would cost ~10 s of imports each).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from fake_hf_hub import FakeHub  # noqa: E402

import unicom  # noqa: E402
from unicom.checkpoint import CheckpointError  # noqa: E402
from unicom.hf import main as hf_main  # noqa: E402
from unicom._hub import DownloadError  # noqa: E402

TINY = dict(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2, num_heads=2)
# huggingface_hub's own LFS upload passes its file as data= to httpx, which warns about that
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")]


def _reload_hub_settings() -> None:
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


def tiny(seed: int) -> unicom.VisionTransformer:
    torch.manual_seed(seed)
    return unicom.VisionTransformer(**TINY).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def hub(tmp_path):
    """A fresh Hub and an empty HF_HOME; huggingface_hub's settings restored afterwards."""
    with FakeHub() as server, pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.delenv(var, raising=False)
        mp.setenv("HF_ENDPOINT", server.endpoint)
        mp.setenv("HF_HOME", str(tmp_path / "hf_home"))
        mp.setenv("HF_HUB_DISABLE_XET", "1")  # the fake Hub speaks LFS, not Xet
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _reload_hub_settings()
        server.monkeypatch = mp
        try:
            yield server
        finally:
            mp.undo()
            _reload_hub_settings()


def publish(hub: FakeHub, folder: Path, repo_id: str, branch: str = "main") -> str:
    """Commit a folder's files straight into the fake Hub (the test's own upload)."""
    return hub.commit(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()}, branch)


# ----------------------------------------------------------------------------- downloads


def test_download_loads_the_published_folder(hub, tmp_path) -> None:
    model = tiny(0)
    publish(hub, unicom.save_pretrained(model, tmp_path / "folder"), "org/tiny")

    loaded, transform = unicom.load("hf-hub:org/tiny", device="cpu")

    assert same_weights(loaded, model)
    assert transform.transforms[-2].__class__.__name__ == "ToTensor"
    assert transform.transforms[2].size == (32, 32)  # CenterCrop of the recorded input size
    # the model file came through the CDN redirect, as LFS files do on the Hub
    assert any(path.startswith("/lfs/") for method, path in hub.requests if method == "GET")
    cache = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny"
    assert (cache / "blobs").is_dir()  # huggingface_hub's own cache, nothing of ours


def test_revision_picks_that_commit_or_branch(hub, tmp_path) -> None:
    first, second = tiny(0), tiny(1)
    old = publish(hub, unicom.save_pretrained(first, tmp_path / "a"), "org/tiny")
    publish(hub, unicom.save_pretrained(second, tmp_path / "b"), "org/tiny")
    publish(hub, unicom.save_pretrained(first, tmp_path / "a"), "org/tiny", branch="v1")

    assert same_weights(unicom.load("hf-hub:org/tiny", device="cpu")[0], second)
    assert same_weights(unicom.load(f"hf-hub:org/tiny@{old}", device="cpu")[0], first)
    assert same_weights(unicom.load("hf-hub:org/tiny@v1", device="cpu")[0], first)
    with pytest.raises(DownloadError, match=r"hf-hub:org/tiny@nope: revision 'nope' not found in org/tiny"):
        unicom.load("hf-hub:org/tiny@nope", device="cpu")


def test_cached_reload_offline_makes_no_request(hub, tmp_path) -> None:
    model = tiny(0)
    publish(hub, unicom.save_pretrained(model, tmp_path / "folder"), "org/tiny")
    unicom.load("hf-hub:org/tiny", device="cpu")
    hub.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _reload_hub_settings()
    seen = len(hub.requests)

    loaded, _ = unicom.load("hf-hub:org/tiny", device="cpu")

    assert same_weights(loaded, model) and len(hub.requests) == seen
    with pytest.raises(DownloadError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        unicom.load("hf-hub:org/never-downloaded", device="cpu")


def test_missing_repository_is_one_clear_error(hub) -> None:
    with pytest.raises(DownloadError) as info:
        unicom.load("hf-hub:org/missing", device="cpu")
    message = str(info.value)
    assert message.startswith("hf-hub:org/missing: repository org/missing not found")
    assert "HF_TOKEN" in message and "\n" not in message


def test_a_repository_without_the_files_says_so(hub) -> None:
    hub.commit("org/other", {"README.md": b"# not a unicom model\n"})
    with pytest.raises(DownloadError, match="org/other has no config.json: not a unicom model folder"):
        unicom.load("hf-hub:org/other", device="cpu")


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_corrupt_download_is_an_error_never_other_weights(hub, tmp_path, damage: str) -> None:
    folder = unicom.save_pretrained(tiny(0), tmp_path / "folder")
    publish(hub, folder, "org/tiny")
    data = (folder / "model.safetensors").read_bytes()
    oid = hashlib.sha256(data).hexdigest()
    if damage == "flipped":  # same size: only the SHA-256 save_model records can tell
        bad = bytearray(data)
        bad[-100] ^= 0x10
        hub.corrupt(oid, bytes(bad))
        with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged.*do not match the SHA-256"):
            unicom.load("hf-hub:org/tiny", device="cpu")
    else:  # cut short: huggingface_hub compares the size with the Hub's
        hub.corrupt(oid, data[: len(data) // 2])
        with pytest.raises(DownloadError, match=r"hf-hub:org/tiny: model\.safetensors: .*size"):
            unicom.load("hf-hub:org/tiny", device="cpu")


def test_config_that_disagrees_with_the_weights_is_refused(hub, tmp_path) -> None:
    folder = unicom.save_pretrained(tiny(0), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["model_config"]["num_heads"] = 4  # same shapes, other attention: would load silently
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="recorded in the weights differs from config.json"):
        unicom.load(str(folder), device="cpu")
    config["embedding_size"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="embedding_size 7 disagrees"):
        unicom.load(str(folder), device="cpu")


@pytest.mark.parametrize("name", ["hf-hub:", "hf-hub:org", "hf-hub:org/", "hf-hub:a/b/c", "hf-hub:org/name@"])
def test_malformed_hub_names(name: str) -> None:
    with pytest.raises(ValueError, match="expected hf-hub:<org>/<name>"):
        unicom.load(name, device="cpu")


# ----------------------------------------------------------------------------- saving and publishing


def test_save_pretrained_writes_the_folder_and_card(tmp_path) -> None:
    results = {"dataset": "sop", "recall": {"1": 81.25, "10": 93.5}, "map_at_r": 44.0, "epoch": 3,
               "settings": {"lr": 1e-05, "epochs": 3, "margin_loss_m2": 0.25}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    folder = unicom.save_pretrained(tiny(0), tmp_path / "out", results=tmp_path / "results.json")

    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_config"] == unicom.VisionTransformer(**TINY).config.to_dict()
    assert (config["embedding_size"], config["input_size"]) == (32, 32)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: unicom\n")
    assert "| depth | 2 |" in card and "| margin_loss_m2 | 0.25 |" in card
    assert "## Results on sop" in card and "| Recall@1 (%) | 81.25 |" in card and "| MAP@R (%) | 44.00 |" in card
    assert same_weights(unicom.load(str(folder), device="cpu")[0], tiny(0))
    with pytest.raises(TypeError, match="expected a unicom VisionTransformer"):
        unicom.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_push_to_hub_round_trip(hub, tmp_path) -> None:
    model = tiny(0)
    url = unicom.push_to_hub(model, "org/pushed", results={"dataset": "cub", "recall": {"1": 50.0}})

    assert url.startswith(f"{hub.endpoint}/org/pushed/commit/")
    methods = {(m, p) for m, p in hub.requests}
    assert ("POST", "/api/repos/create") in methods and ("POST", "/api/models/org/pushed/commit/main") in methods
    assert any(m == "PUT" for m, _ in methods)  # the weights went through the LFS upload
    loaded, _ = unicom.load("hf-hub:org/pushed", device="cpu")
    assert same_weights(loaded, model)
    files = hub.repos["org/pushed"].commits[hub.repos["org/pushed"].branches["main"]]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert 'unicom.load("hf-hub:org/pushed")' in files["README.md"].decode()

    second = tiny(1)  # the repository exists now: a second push is a new commit
    unicom.push_to_hub(second, "org/pushed")
    assert same_weights(unicom.load("hf-hub:org/pushed", device="cpu")[0], second)


def test_export_turns_a_fine_tuning_checkpoint_into_a_folder(checkpoint, tmp_path, capsys) -> None:
    from unicom.checkpoint import save_model

    run = tmp_path / "run"
    model, _ = unicom.load(checkpoint, device="cpu")
    save_model(model, run / "model_best.pt")
    (run / "results.json").write_text(json.dumps({"dataset": "cub", "recall": {"1": 12.5}, "settings": {"lr": 0.1}}))

    assert hf_main(["export", str(run / "model_best.pt"), str(tmp_path / "folder")]) == 0
    assert "results from" in capsys.readouterr().out
    card = (tmp_path / "folder" / "README.md").read_text()
    assert "| Recall@1 (%) | 12.50 |" in card and "| lr | 0.1 |" in card
    assert same_weights(unicom.load(str(tmp_path / "folder"), device="cpu")[0], model)

    assert hf_main(["export", str(tmp_path / "nothing.pt"), str(tmp_path / "f2")]) == 2
    assert "no file exists at" in capsys.readouterr().err
