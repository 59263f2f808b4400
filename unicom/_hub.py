"""Download, cache and verify files: the only network code of unicom.

``download(url, sha256)`` returns the path of a verified local copy of ``url``:

* A cached file with the right SHA256 is returned without touching the network. A cached
  file with the wrong hash is logged, deleted and fetched again.
* Bytes are streamed into ``<target>.part`` beside the target, hashed while they arrive,
  checked, and only then moved into place with ``os.replace`` (atomic on POSIX), so the
  target path never holds a partial or corrupt file.
* An interrupted transfer resumes: an existing ``.part`` is continued with an HTTP
  ``Range`` request when the server honours it (206), and restarted from zero when it does
  not (200). Dropped connections, timeouts and 5xx answers are retried up to ``retries``
  times, each retry resuming from what was received.
* The processes of one job on one node (torchrun) share the work through an exclusive
  ``flock`` on ``<target>.lock``: one downloads, the others wait and then find the verified
  file in the cache. (``flock`` is node-local; across nodes on a shared file system it
  depends on the file system, so give each node its own cache or download beforehand.)

Environment variables:

* ``UNICOM_CACHE_DIR``: the cache folder (default ``~/.cache/unicom``).
* ``UNICOM_MIRROR``: a base URL replacing the release prefix
  ``https://github.com/deepglint/unicom/releases/download``.
* ``UNICOM_OFFLINE=1``: never use the network; the file must already be in place.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:  # POSIX only; without it (Windows) concurrent downloads are simply not coordinated.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RELEASE_PREFIX",
    "DownloadError",
    "ChecksumError",
    "cache_dir",
    "resolve_url",
    "download",
]

logger = logging.getLogger(__name__)

RELEASE_PREFIX = "https://github.com/deepglint/unicom/releases/download"

_CHUNK = 1 << 20  # 1 MiB: read, write and hash buffer size; files are never read whole.
_RETRY_BACKOFF_S = 1.0  # first retry waits this long, doubling each time (capped below)
_RETRY_BACKOFF_MAX_S = 30.0
_USER_AGENT = "unicom-hub"
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_SCHEMES = ("http", "https", "file")
# A transfer must deliver at least this many bytes in every `timeout` seconds: the socket
# timeout bounds each read only, and a server that trickles a byte at a time would never end.
_MIN_BYTES_PER_TIMEOUT = 64 * 1024


class DownloadError(RuntimeError):
    """A file could not be downloaded or found; the message says what to do."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected SHA256."""


class _TransientError(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx); carries the message."""


class _RestartFromZero(Exception):
    """The server answered a resumed request in a way that needs a fresh download."""


def cache_dir() -> Path:
    """The cache folder: ``$UNICOM_CACHE_DIR`` if set, else ``~/.cache/unicom``."""
    env = os.environ.get("UNICOM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/unicom").expanduser()


def resolve_url(url: str) -> str:
    """Apply ``$UNICOM_MIRROR`` to a release URL; other URLs are returned unchanged.

    With ``UNICOM_MIRROR=http://host/m``, the release URL
    ``https://github.com/deepglint/unicom/releases/download/b32/FP16-ViT-B-32.pt``
    becomes ``http://host/m/b32/FP16-ViT-B-32.pt``.
    """
    mirror = os.environ.get("UNICOM_MIRROR", "").strip()
    if mirror and url.startswith(RELEASE_PREFIX + "/"):
        return mirror.rstrip("/") + url[len(RELEASE_PREFIX) :]
    return url


def _offline() -> bool:
    return os.environ.get("UNICOM_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_local_rank_zero() -> bool:
    # Read the launcher's environment rather than torch.distributed: the progress bar is
    # wanted before (or without) any process group, and hub must not import torch.
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
    return rank.strip() in ("", "0")


def _filename_from_url(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not _is_plain_name(name):
        raise ValueError(f"cannot derive a file name from URL {url!r}; pass filename=")
    return name


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _hash_file(path: Path, hasher: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    """Feed ``path`` into ``hasher`` (a new sha256 by default) in 1 MiB pieces."""
    hasher = hasher if hasher is not None else hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher


def _verified(path: Path, expected: str | None) -> tuple[bool, str | None]:
    """(ok, actual hash) of an existing file; with no expected hash any file is ok."""
    if expected is None:
        return True, None
    actual = _hash_file(path).hexdigest()
    return actual == expected, actual


def _manual_hint(url: str, target: Path, expected: str | None) -> str:
    check = f" whose SHA256 is {expected}" if expected else ""
    return (
        f"To work offline, fetch {url} by other means and place the file{check} at "
        f"{target} (then set UNICOM_OFFLINE=1 to skip the network), or set UNICOM_MIRROR "
        f"to a mirror of {RELEASE_PREFIX}."
    )


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed, never deleted).

    The lock file is left in place on purpose: deleting it would let a waiter lock the
    removed inode while a newcomer locks a fresh file, and both would download.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:  # 0o666 less the umask: a cache shared by several users stays usable by all
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DownloadError(f"cannot write to the cache folder {lock_path.parent} ({e}): set UNICOM_CACHE_DIR "
                            "or pass root= (download_root=) to a writable folder") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish downloading (lock %s)", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def download(
    url: str,
    sha256: str | None,
    root: str | os.PathLike | None = None,
    *,
    filename: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 3,
) -> str:
    """Return the local path of a verified copy of ``url``, downloading it if needed.

    Args:
        url: the file's URL; release URLs are rewritten by ``$UNICOM_MIRROR``
            (see :func:`resolve_url`).
        sha256: the expected hex SHA256 of the file. ``None`` skips verification (for
            user-supplied URLs): any cached file of that name is then trusted as is, and
            only the length announced by the server is checked.
        root: the folder to store the file in; default :func:`cache_dir`.
        filename: the local file name; default the last path component of the URL.
        progress: show a tqdm bar on stderr (only on local rank 0).
        timeout: seconds to wait for the connection and for each read; a transfer that
            delivers less than 64 KiB in any ``timeout`` seconds has stalled (a transient
            failure, retried).
        retries: how many times a transient failure (dropped connection, timeout,
            HTTP 5xx/408/429) is retried, each time resuming from the bytes received.

    Returns:
        The path of the verified file, ``<root>/<filename>``.

    Raises:
        DownloadError: the file could not be fetched or stored (the message gives the
            reason, the URL, the target path and how to place the file by hand); also when
            ``$UNICOM_OFFLINE`` is set and the file is missing or wrong.
        ChecksumError: the downloaded bytes have the wrong SHA256 (nothing is kept).
        ValueError: ``sha256`` is not 64 hex digits, ``url`` is not an http(s) or file URL,
            ``timeout`` is not a finite positive number, ``retries`` is negative, or no file name
            can be derived. These are never retried.
    """
    if sha256 is not None and not _SHA256_RE.match(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
    expected = sha256.lower() if sha256 is not None else None
    url = resolve_url(url)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES or (scheme != "file" and not urllib.parse.urlsplit(url).netloc):
        raise ValueError(f"cannot download {url!r}: expected an http://, https:// or file:// URL with a host "
                         "(check UNICOM_MIRROR if it was set)")
    name = filename if filename is not None else _filename_from_url(url)
    if not _is_plain_name(name):
        raise ValueError(f"filename must be a plain file name, got {name!r}")
    root_path = Path(os.path.abspath(Path(root if root is not None else cache_dir()).expanduser()))
    target = root_path / name
    if target.is_dir():
        raise DownloadError(f"cannot download {url} to {target}: that path is a folder. Remove it, or pass "
                            "another root= (download_root=) or filename=")

    if _offline():
        return _offline_lookup(url, target, expected)

    # Fast path without the lock (a read-only cache needs no lock file): os.replace makes
    # the target appear whole, so any file seen here is complete; only its hash may be bad.
    if target.is_file():
        ok, _ = _verified(target, expected)
        if ok:
            return str(target)

    try:
        root_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # also FileExistsError: a file where the folder should be
        raise DownloadError(f"cannot create the cache folder {root_path}: {e}. "
                            f"Set UNICOM_CACHE_DIR or pass root= to a writable folder.") from e

    with _file_lock(target.with_name(name + ".lock")):
        # Re-check under the lock: another process may have finished it while we waited.
        if target.is_file():
            ok, actual = _verified(target, expected)
            if ok:
                return str(target)
            logger.warning(
                "cached file %s has SHA256 %s, expected %s; deleting it and downloading %s again",
                target, actual, expected, url,
            )
            target.unlink()
        _download_locked(url, target, expected, progress=progress, timeout=timeout, retries=retries)
    return str(target)


def _offline_lookup(url: str, target: Path, expected: str | None) -> str:
    if not target.is_file():
        raise DownloadError(
            f"UNICOM_OFFLINE is set and {target} does not exist. Download {url} on a "
            f"machine with internet access and copy it to exactly {target}"
            + (f" (SHA256 {expected})." if expected else ".")
        )
    ok, actual = _verified(target, expected)
    if not ok:
        raise DownloadError(
            f"UNICOM_OFFLINE is set and {target} has SHA256 {actual}, expected {expected}: "
            f"the file is corrupt or a different version. Replace it with a fresh copy of {url}."
        )
    return str(target)


def _download_locked(
    url: str, target: Path, expected: str | None, *, progress: bool, timeout: float, retries: int
) -> None:
    """Fetch ``url`` into ``<target>.part``, verify it and move it to ``target``.

    Runs under the file lock, so it owns the ``.part`` file.
    """
    part = target.with_name(target.name + ".part")
    show_bar = progress and _is_local_rank_zero()
    logger.info("downloading %s to %s", url, target)
    failures = 0
    restarted = False  # a stale .part gets one fresh download before we blame the server
    while True:
        resumed_from = part.stat().st_size if part.exists() else 0
        try:
            digest = _fetch_into(url, part, target, expected, timeout=timeout, show_bar=show_bar)
        except (_TransientError, _RestartFromZero) as e:
            if isinstance(e, _RestartFromZero):
                # Counted as a failure too, so a server that keeps answering oddly cannot
                # make this loop forever.
                logger.warning("%s; restarting %s from zero", e, url)
                part.unlink(missing_ok=True)
            failures += 1
            if failures > retries:
                kept = (
                    f"The partial file {part} is kept and the next call resumes from it. "
                    if part.exists() else f"Nothing was written to {target}. "
                )
                raise DownloadError(
                    f"could not download {url} to {target} after {failures} attempt(s): {e}. "
                    + kept + _manual_hint(url, target, expected)
                ) from None
            delay = min(_RETRY_BACKOFF_S * 2 ** (failures - 1), _RETRY_BACKOFF_MAX_S)
            logger.warning("%s; retry %d/%d in %.1f s", e, failures, retries, delay)
            time.sleep(delay)
            continue

        if expected is None or digest == expected:
            break
        part.unlink(missing_ok=True)
        if resumed_from > 0 and not restarted:
            # The old .part may come from an earlier version of the file; try once afresh.
            restarted = True
            logger.warning(
                "SHA256 of %s resumed from an existing partial file is %s, expected %s; "
                "downloading it again from zero", url, digest, expected,
            )
            continue
        raise ChecksumError(
            f"SHA256 mismatch for {url}: expected {expected}, got {digest}. The downloaded "
            f"file was deleted and nothing was written to {target}. The file at the URL may "
            f"have changed or been corrupted in transit: retry, or check the URL. "
            + _manual_hint(url, target, expected)
        )
    try:
        os.replace(part, target)
    except OSError as e:  # a folder created at the target meanwhile, a read-only cache
        raise DownloadError(f"downloaded {url} but could not move it to {target}: {e}. The verified file is "
                            f"kept at {part}.") from e
    logger.info("saved %s", target)


def _open_response(url: str, offset: int, timeout: float, target: Path, expected: str | None):
    """Send the GET (with ``Range`` when resuming); map failures to our exceptions.

    Returns ``None`` when the server answers a resumed request with 416 and a length equal
    to the ``.part``'s: the file is already whole (the hash still decides).
    """
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # "Content-Range: bytes */N" gives the file's length. Only a .part of exactly
            # that length can be the whole file; any other is stale (say, a longer older
            # version), which must not be accepted even when there is no hash to catch it.
            m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", e.headers.get("Content-Range") or "")
            if m is not None and int(m.group(1)) == offset:
                return None
            raise _RestartFromZero(f"server cannot resume {url} at byte {offset} (HTTP 416)")
        status = f"HTTP {e.code} {e.reason}"
        if e.code >= 500 or e.code in (408, 429):
            raise _TransientError(f"{status} from {url}") from None
        raise DownloadError(
            f"could not download {url}: {status}. Nothing was written to {target}. "
            + _manual_hint(url, target, expected)
        ) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _TransientError(f"connecting to {url} timed out after {timeout} s") from None
        raise _TransientError(f"could not reach {url}: {reason}") from None
    except (TimeoutError, socket.timeout):
        raise _TransientError(f"no answer from {url} within {timeout} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise _TransientError(f"connection to {url} failed: {e!r}") from None


def _fetch_into(
    url: str, part: Path, target: Path, expected: str | None, *, timeout: float, show_bar: bool
) -> str:
    """One attempt: append (206) or write (200) the response to ``part``; return its SHA256.

    Raises ``_TransientError`` for network trouble (``part`` keeps what arrived, so the
    next attempt resumes), ``DownloadError`` for local write failures.
    """
    offset = part.stat().st_size if part.exists() else 0
    response = _open_response(url, offset, timeout, target, expected)
    if response is None:
        # 416 with the .part's own length: it is already complete (a process killed before
        # os.replace); the hash decides, and the caller restarts from zero if it is wrong.
        logger.info("server reports %s complete at %d bytes", url, offset)
        return _hash_file(part).hexdigest()

    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise _RestartFromZero(
                    f"server resumed {url} at byte {start}, asked for {offset}"
                )
            # The hash covers the whole file, so the bytes already on disk go in first.
            hasher = _hash_file(part)
            mode = "ab"
        else:
            if offset:
                logger.info("server ignored the Range request for %s; restarting from zero", url)
            offset, total = 0, length
            hasher = hashlib.sha256()
            mode = "wb"
        if total is None and length is not None:
            total = offset + length

        from tqdm import tqdm  # deferred: importing hub stays cheap

        received = 0
        window_start, window_bytes = time.monotonic(), 0
        try:
            with open(part, mode) as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=target.name, file=sys.stderr, disable=not show_bar, leave=True,
            ) as bar:
                while True:
                    chunk = _read_chunk(response, url, timeout, received, length)
                    if not chunk:
                        break
                    window_bytes += len(chunk)
                    now = time.monotonic()
                    if now - window_start >= timeout:
                        if window_bytes < _MIN_BYTES_PER_TIMEOUT and (length is None or received + len(chunk) < length):
                            raise _TransientError(f"{url} stalled: {window_bytes} bytes in {now - window_start:.1f} s "
                                                  f"(less than {_MIN_BYTES_PER_TIMEOUT // 1024} KiB per {timeout} s)")
                        window_start, window_bytes = now, 0
                    f.write(chunk)  # OSError from here on is local (disk), not network
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before os.replace publishes it
        except OSError as e:
            raise _local_write_error(e, url, part, target) from e

    if length is not None and received < length:
        raise _TransientError(f"connection to {url} closed after {received} of {length} bytes")
    return hasher.hexdigest()


def _read_chunk(response, url: str, timeout: float, received: int, length: int | None) -> bytes:
    """Read up to 1 MiB of the body, turning network failures into ``_TransientError``."""
    try:  # read1: what has arrived (up to 1 MiB), so that a slow server cannot hold one call forever
        return response.read1(_CHUNK)
    except http.client.IncompleteRead as e:
        got = received + len(e.partial)
        # e.partial is dropped: simpler to re-request those few bytes than to keep them.
        raise _TransientError(
            f"connection to {url} closed early (after about {got} of {length} bytes)"
        ) from None
    except (TimeoutError, socket.timeout):
        raise _TransientError(f"reading {url} timed out after {timeout} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise _TransientError(f"connection to {url} dropped: {e!r}") from None


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None when ``*``)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if m is None:
        raise _RestartFromZero(f"unusable Content-Range {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), total


def _local_write_error(e: OSError, url: str, part: Path, target: Path) -> DownloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        # A full disk will not resume any better; free the space the partial file holds.
        part.unlink(missing_ok=True)
        return DownloadError(
            f"no space left on the device while writing {part} (downloading {url}): {e}. "
            f"The partial file was deleted and nothing was written to {target}. Free some "
            f"space, or set UNICOM_CACHE_DIR (or pass root=) to a folder on a larger disk."
        )
    return DownloadError(
        f"could not write {part} (downloading {url}): {e}. Nothing was written to {target}. "
        f"Check the folder's permissions, or set UNICOM_CACHE_DIR to a writable folder."
    )
