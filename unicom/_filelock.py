"""A lock file that leaves no trace: ``flock`` on a file that the process that created it removes.

Standard library only, like the download code that uses it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, downloads still write atomically
    fcntl = None

logger = logging.getLogger("unicom.hub")


@contextmanager
def file_lock(lock_path: Path, error: type[Exception] = OSError) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the process that created the file removes it
    again, still holding the lock, so no empty lock file is left in the cache.

    A waiter may then hold the lock on a file that no longer has that name (or whose name now
    belongs to a newer lock file): it sees that, lets go and locks the path afresh, so two
    processes never hold "the" lock at once. A lock file this process did not create (one left
    by a killed process) is locked as it is and left in place.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        fd, created = _open_lock_file(lock_path, error)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process to finish downloading (lock %s)", lock_path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _names_file(lock_path, fd):
            break
        os.close(fd)  # removed by its creator while this process waited: lock the path again
    try:
        yield
    finally:
        if created:
            lock_path.unlink(missing_ok=True)  # before the lock is released (see above)
        os.close(fd)  # closing the descriptor releases the lock


def _open_lock_file(lock_path: Path, error: type[Exception]) -> tuple[int, bool]:
    """(descriptor, whether this call created the file) of ``lock_path``."""
    while True:
        try:
            try:  # 0o666 less the umask: a cache shared by several users stays usable by all
                return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
            except FileExistsError:
                return os.open(lock_path, os.O_RDWR), False
        except OSError as e:
            if isinstance(e, FileNotFoundError) and lock_path.parent.is_dir():
                continue  # removed by its creator between the two opens: create it
            raise error(f"cannot write to the cache folder {lock_path.parent} ({e}): set UNICOM_CACHE_DIR "
                                "or pass root= (download_root=) to a writable folder") from e


def _names_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd``."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
