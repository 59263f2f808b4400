"""A real `unicom serve` for the tests: the command itself in a subprocess, on 127.0.0.1 on a free port.

The server runs in its own process (not a thread of the test process), so the tests see what a
user sees (the command's startup, its errors, its exit) and no import in the test thread can race
the server's (CPython 3.11's parser is not safe against that).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from http_server import free_port

__all__ = ["TOKEN", "ServeProcess"]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"  # what the shared test server requires


class ServeProcess:
    """``with ServeProcess(col, "--token", "t") as server: httpx.get(server.url("/health"))``."""

    def __init__(self, collection: str | os.PathLike, *args: str, log: Path, startup_s: float = 120,
                 env: dict | None = None) -> None:
        self.collection, self.args, self.log, self.startup_s = str(collection), list(args), Path(log), startup_s
        self.env = env or {}
        self.port = 0
        self.process: subprocess.Popen | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> ServeProcess:
        for _ in range(3):  # another process may take the free port between the check and the bind
            self.port = free_port()
            if self._start():
                return self
            if "address already in use" not in self.output():
                break
        raise RuntimeError(f"`unicom serve` did not start:\n{self.output()[-4000:]}")

    def _start(self) -> bool:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **self.env}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "unicom", "serve", self.collection, "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> int:
        """Stop as Ctrl+C does; the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
