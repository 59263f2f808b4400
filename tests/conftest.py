import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"test fixtures not found at {FIXTURES}: the project expects ../shared beside it")
    return FIXTURES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache or a mirror/offline setting from the environment."""
    monkeypatch.setenv("UNICOM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    for var in ("UNICOM_MIRROR", "UNICOM_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield


os.environ.setdefault("OMP_NUM_THREADS", "2")
