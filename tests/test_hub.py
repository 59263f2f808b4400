"""Tests of unicom._hub against a real HTTP server on 127.0.0.1 (no mocks of the network)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import pytest

from unicom import _hub as hub
from unicom._hub import ChecksumError, DownloadError, cache_dir, download, resolve_url

try:  # tests/ as a package or as a plain folder on sys.path (pytest's default)
    from .http_server import FileServer, download_worker, free_port
except ImportError:
    from http_server import FileServer, download_worker, free_port

# 1.5 MiB: more than one 1 MiB read/hash buffer, small enough to stay fast.
DATA = random.Random(0).randbytes(3 << 19)
SHA = hashlib.sha256(DATA).hexdigest()
PATH = "/files/weights.bin"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("UNICOM_MIRROR", "UNICOM_OFFLINE", "LOCAL_RANK", "RANK", "http_proxy",
                "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("UNICOM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_RETRY_BACKOFF_S", 0.01)  # retries without real waiting


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _leftovers(root: Path) -> list[str]:
    """Files in root other than the lock file."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- the normal paths ----------------------------------------------------------------


def test_good_download_into_default_cache(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA)
    path = download(url, SHA, progress=False)
    assert path == str(root / "weights.bin")
    assert Path(path).read_bytes() == DATA
    assert [r.range for r in server.requests] == [None]
    assert _leftovers(root) == ["weights.bin"]  # no .part left behind


def test_filename_argument_and_uppercase_hash(server: FileServer, tmp_path: Path) -> None:
    url = server.add(PATH, DATA)
    path = download(url, SHA.upper(), tmp_path / "elsewhere", filename="x.pt", progress=False)
    assert path == str(tmp_path / "elsewhere" / "x.pt")
    assert _sha(path) == SHA


def test_good_cached_file_makes_no_request(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA)
    root.mkdir()
    (root / "weights.bin").write_bytes(DATA)
    assert download(url, SHA, progress=False) == str(root / "weights.bin")
    assert download(url, None, progress=False) == str(root / "weights.bin")
    assert server.requests == []


def test_corrupt_cache_is_fetched_again(server: FileServer, root: Path, caplog) -> None:
    url = server.add(PATH, DATA)
    root.mkdir()
    (root / "weights.bin").write_bytes(DATA[:-1] + b"\x00")
    with caplog.at_level(logging.WARNING, logger="unicom._hub"):
        path = download(url, SHA, progress=False)
    assert _sha(path) == SHA
    assert len(server.requests) == 1
    assert any("weights.bin" in r.getMessage() and SHA in r.getMessage() for r in caplog.records)


def test_a_cache_folder_it_cannot_write_to_is_a_download_error(server: FileServer, root: Path) -> None:
    """The lock file cannot be made (here: a folder stands in its place; read-only file systems and
    other users' caches fail the same way): a DownloadError that says what to do, not an OSError."""
    url = server.add(PATH, DATA)
    (root / "weights.bin.lock").mkdir(parents=True)
    with pytest.raises(DownloadError, match="UNICOM_CACHE_DIR"):
        download(url, SHA, progress=False)
    assert server.requests == []


def test_no_checksum_means_no_verification(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA)
    assert Path(download(url, None, progress=False)).read_bytes() == DATA


# ---- resuming --------------------------------------------------------------------------


def test_resume_from_existing_part_sends_range(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA)
    root.mkdir()
    (root / "weights.bin.part").write_bytes(DATA[:300_000])
    path = download(url, SHA, progress=False)
    assert [r.range for r in server.requests] == ["bytes=300000-"]
    assert Path(path).read_bytes() == DATA
    assert _leftovers(root) == ["weights.bin"]


def test_stale_part_from_other_file_restarts_from_zero(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA)
    root.mkdir()
    (root / "weights.bin.part").write_bytes(b"\xff" * 300_000)  # right length, wrong bytes
    path = download(url, SHA, progress=False)
    assert [r.range for r in server.requests] == ["bytes=300000-", None]
    assert Path(path).read_bytes() == DATA


def test_complete_part_is_finished_after_416(server: FileServer, root: Path) -> None:
    # A process killed between the last byte and os.replace leaves a whole .part.
    url = server.add(PATH, DATA)
    root.mkdir()
    (root / "weights.bin.part").write_bytes(DATA)
    path = download(url, SHA, progress=False)
    assert [r.range for r in server.requests] == [f"bytes={len(DATA)}-"]
    assert Path(path).read_bytes() == DATA


def test_longer_stale_part_is_not_accepted_without_hash(server: FileServer, root: Path) -> None:
    # 416 alone does not mean "complete": a .part longer than the file is stale, and with
    # sha256=None no hash would catch it, so the length in Content-Range must.
    url = server.add(PATH, DATA)
    root.mkdir()
    (root / "weights.bin.part").write_bytes(DATA + b"stale tail")
    path = download(url, None, progress=False)
    assert [r.range for r in server.requests] == [f"bytes={len(DATA) + 10}-", None]
    assert Path(path).read_bytes() == DATA


def test_dropped_connection_is_resumed(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA, "drop_once", cut=700_000)
    path = download(url, SHA, progress=False, retries=1)
    assert [r.range for r in server.requests] == [None, "bytes=700000-"]
    assert Path(path).read_bytes() == DATA


def test_server_ignoring_range_restarts_cleanly(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA, "ignore_range")
    root.mkdir()
    (root / "weights.bin.part").write_bytes(DATA[:300_000])
    path = download(url, SHA, progress=False)
    assert [r.range for r in server.requests] == ["bytes=300000-"]  # asked, got a 200
    assert Path(path).read_bytes() == DATA  # not the 300 kB prefix twice


@pytest.mark.parametrize("sha", [SHA, None], ids=["sha256", "no-sha256"])
def test_truncated_responses_never_publish_a_file(server: FileServer, root: Path, sha) -> None:
    url = server.add(PATH, DATA, "truncate")
    with pytest.raises(DownloadError) as info:
        download(url, sha, progress=False, retries=2)
    msg = str(info.value)
    assert url in msg and "closed" in msg and "3 attempt" in msg
    assert not (root / "weights.bin").exists()
    # Each retry resumed from the bytes received so far: half, then half of the rest, ...
    n = len(DATA)
    first, second = n // 2, n // 2 + (n - n // 2) // 2
    assert [r.range for r in server.requests] == [None, f"bytes={first}-", f"bytes={second}-"]
    # What was kept is a correct prefix, and a later call finishes it.
    part = (root / "weights.bin.part").read_bytes()
    assert DATA.startswith(part) and len(part) == second + (n - second) // 2
    server.add(PATH, DATA)
    assert _sha(download(url, sha, progress=False)) == SHA


# ---- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["404", "500"])
def test_http_errors(server: FileServer, root: Path, status: str) -> None:
    url = server.add(PATH, DATA, status)
    with pytest.raises(DownloadError) as info:
        download(url, SHA, progress=False, retries=2)
    msg = str(info.value)
    assert f"HTTP {status}" in msg and url in msg and str(root / "weights.bin") in msg
    # 5xx may be transient and is retried; 404 is not.
    assert len(server.requests) == (3 if status == "500" else 1)
    assert _leftovers(root) == []


def test_wrong_bytes_raise_checksum_error(server: FileServer, root: Path) -> None:
    wrong = bytes(len(DATA))
    url = server.add(PATH, DATA, "wrong", wrong=wrong)
    with pytest.raises(ChecksumError) as info:
        download(url, SHA, progress=False)
    msg = str(info.value)
    assert SHA in msg and hashlib.sha256(wrong).hexdigest() in msg and url in msg
    assert _leftovers(root) == []  # neither the target nor the bad .part


def test_timeout(server: FileServer, root: Path) -> None:
    url = server.add(PATH, DATA, "slow", delay=2.0)
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="timed out") as info:
        download(url, SHA, progress=False, timeout=0.2, retries=1)
    assert time.monotonic() - t0 < 1.5
    assert url in str(info.value)
    assert not (root / "weights.bin").exists()


def test_connection_refused(root: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/files/weights.bin"
    with pytest.raises(DownloadError) as info:
        download(url, SHA, progress=False, retries=1)
    msg = str(info.value)
    assert url in msg and "refused" in msg.lower() and "UNICOM_OFFLINE" in msg
    assert _leftovers(root) == []


def test_full_disk(server: FileServer, root: Path) -> None:
    # A real ENOSPC from the kernel without mounting a small file system (needs root):
    # the .part path is a symlink to /dev/full, whose every write fails with ENOSPC.
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is needed to produce a real ENOSPC")
    url = server.add(PATH, DATA)
    root.mkdir()
    os.symlink("/dev/full", root / "weights.bin.part")
    with pytest.raises(DownloadError, match="no space left") as info:
        download(url, SHA, progress=False)
    assert "UNICOM_CACHE_DIR" in str(info.value)
    assert _leftovers(root) == []  # no target, and the partial file was removed
    assert len(server.requests) == 1  # a full disk is not retried


# ---- environment variables -------------------------------------------------------------


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("UNICOM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "unicom"


def test_mirror(server: FileServer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = f"{hub.RELEASE_PREFIX}/b32/FP16-ViT-B-32.pt"
    assert resolve_url(release) == release
    monkeypatch.setenv("UNICOM_MIRROR", server.url("/m/"))
    assert resolve_url(release) == server.url("/m/b32/FP16-ViT-B-32.pt")
    assert resolve_url("https://example.com/b32/x.pt") == "https://example.com/b32/x.pt"
    server.add("/m/b32/FP16-ViT-B-32.pt", DATA)
    path = download(release, SHA, progress=False)
    assert path == str(root / "FP16-ViT-B-32.pt") and _sha(path) == SHA
    assert [r.path for r in server.requests] == ["/m/b32/FP16-ViT-B-32.pt"]


def test_offline(server: FileServer, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.add(PATH, DATA)
    monkeypatch.setenv("UNICOM_OFFLINE", "1")
    target = root / "weights.bin"
    with pytest.raises(DownloadError) as info:  # missing: where to put it, where to get it
        download(url, SHA, progress=False)
    assert str(target) in str(info.value) and url in str(info.value)
    root.mkdir()
    target.write_bytes(DATA[::-1])
    with pytest.raises(DownloadError) as info:  # wrong: say so, never fetch
        download(url, SHA, progress=False)
    assert str(target) in str(info.value) and SHA in str(info.value)
    target.write_bytes(DATA)
    assert download(url, SHA, progress=False) == str(target)
    assert server.requests == []


def test_progress_bar_only_on_local_rank_zero(server: FileServer, root: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    url = server.add(PATH, DATA)
    monkeypatch.setenv("LOCAL_RANK", "1")
    download(url, SHA, filename="a.bin")
    assert "a.bin" not in capsys.readouterr().err
    download(url, SHA, filename="b.bin", progress=False)
    monkeypatch.delenv("LOCAL_RANK")
    assert "b.bin" not in capsys.readouterr().err
    download(url, SHA, filename="c.bin")
    out = capsys.readouterr()
    assert "c.bin" in out.err and "100%" in out.err and out.out == ""


def test_argument_checks(server: FileServer) -> None:
    url = server.add(PATH, DATA)
    with pytest.raises(ValueError, match="64 hex"):
        download(url, "abc", progress=False)
    with pytest.raises(ValueError, match="file name"):
        download(server.url("/files/"), SHA, progress=False)
    with pytest.raises(ValueError, match="plain file name"):
        download(url, SHA, filename="../x", progress=False)
    assert server.requests == []


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1])
def test_incremental_hash_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    (tmp_path / "f").write_bytes(data)
    assert hub._hash_file(tmp_path / "f").hexdigest() == hashlib.sha256(data).hexdigest()


# ---- several processes -----------------------------------------------------------------


def test_four_processes_download_once(server: FileServer, root: Path) -> None:
    # slow_stream keeps the transfer open ~0.25 s, so the others arrive while it runs.
    url = server.add(PATH, DATA, "slow_stream", delay=0.01)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    call = ((url, SHA, str(root)), dict(progress=False, retries=0))
    procs = [ctx.Process(target=download_worker, args=(hub.__file__, *call, barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert outcomes == [("ok", str(root / "weights.bin"))] * 4
    assert _sha(root / "weights.bin") == SHA
    assert [r.range for r in server.requests] == [None]  # exactly one full GET
    assert _leftovers(root) == ["weights.bin"]


# ---- transfers that stall, targets and arguments that can never work --------------------


def test_a_server_that_trickles_fails_in_bounded_time(server, root):
    """Each read answers within the timeout, the transfer as a whole goes nowhere: a stall."""
    url = server.add(PATH, DATA, "trickle", delay=0.02)
    with pytest.raises(DownloadError, match="stalled") as error:
        download(url, SHA, root=root, progress=False, timeout=0.5, retries=1)
    assert "after 2 attempt(s)" in str(error.value) and "\n" not in str(error.value)
    assert len(server.requests_for(PATH)) == 2


def test_a_folder_at_the_target_fails_before_the_transfer(server, root):
    url = server.add(PATH, DATA)
    (root / "weights.bin").mkdir(parents=True)
    with pytest.raises(DownloadError, match="is a folder"):
        download(url, SHA, root=root, progress=False)
    assert server.requests == []
    (root.parent / "a_file").write_bytes(b"x")  # a file where the cache folder should be
    with pytest.raises(DownloadError, match="cannot create the cache folder"):
        download(url, SHA, root=root.parent / "a_file" / "cache", progress=False)
    assert server.requests == []


@pytest.mark.parametrize("url,kwargs,message", [
    ("127.0.0.1/files/weights.bin", {}, "http://, https:// or file://"),
    ("ftp://127.0.0.1/files/weights.bin", {}, "http://, https:// or file://"),
    ("http:///files/weights.bin", {}, "with a host"),
    (None, {"timeout": 0}, "timeout"),
    (None, {"timeout": -1.0}, "timeout"),
    (None, {"timeout": float("nan")}, "timeout"),
    (None, {"retries": -1}, "retries"),
])
def test_arguments_that_cannot_work_fail_at_once(server, root, url, kwargs, message):
    good = server.add(PATH, DATA)
    with pytest.raises(ValueError, match=message):  # never tried, so never retried as if transient
        download(url or good, SHA, root=root, progress=False, **kwargs)
    assert server.requests == [] and _leftovers(root) == []
