import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache or a mirror/offline setting from the environment."""
    monkeypatch.setenv("UNICOM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    for var in ("UNICOM_MIRROR", "UNICOM_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture(autouse=True)
def _restore_logging():
    """The programs configure the root logger with a handler on the sys.stderr of the moment,
    which is pytest's capture of a test (closed after it): undo that for the tests after."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny models: on a busy 2-core machine two threads contend
    (OpenMP spin-waits) and are ~100x slower; also the thread count of the programs'
    subprocesses in the tests, so in- and out-of-process runs agree bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random ViT (seed 0) saved in the library's own checkpoint format."""
    import torch

    import unicom
    from unicom.checkpoint import save_model

    torch.manual_seed(0)
    model = unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2, num_heads=2)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(model, path)
    return str(path)


os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def served_collection(tmp_path_factory, checkpoint):
    """(collection, server): a small real collection and `unicom serve` over it as it would be
    deployed (a token, two worker processes), shared by tests/test_serve_*.py."""
    from serve_collection import build_collection
    from serve_server import TOKEN, ServeProcess

    small = build_collection(tmp_path_factory.mktemp("served"), checkpoint)
    with ServeProcess(small.path, "--token", TOKEN, "--workers", "2", "--max-upload-mb", "1", "--max-k", "50",
                      log=tmp_path_factory.mktemp("log") / "serve.log") as server:
        yield small, server
