"""Helpers for the download tests: a real HTTP file server on 127.0.0.1 with selectable
misbehaviour, and a worker for several processes downloading at once.

Each served path has bytes and a behaviour (``Behaviour``); the server records every
request (path and ``Range`` header) so tests can assert what the client sent. It runs a
``ThreadingHTTPServer`` in a background thread; ``with FileServer() as server`` starts and
stops it.
"""

from __future__ import annotations

import importlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Behaviours:
#   good          serve the bytes, honouring "Range: bytes=N-" with 206 (416 past the end)
#   ignore_range  always 200 with the whole file
#   truncate      announce the full Content-Length but send only half of it, then close
#   drop_once     the first request sends `cut` bytes then closes; later requests are good
#   wrong         serve `wrong` bytes instead of the file (Range honoured)
#   slow          send headers, then stall `delay` seconds before the body
#   slow_stream   good, but each 64 KiB block is followed by a `delay` second pause
#   trickle       good, but one byte every `delay` seconds: each read answers in time, the
#                 transfer as a whole makes (almost) no progress
#   404 / 500     that HTTP status
BEHAVIOURS = ("good", "ignore_range", "truncate", "drop_once", "wrong", "slow", "slow_stream",
              "trickle", "404", "500")


@dataclass
class Route:
    data: bytes
    behaviour: str = "good"
    cut: int = 0  # drop_once: bytes sent before the connection is closed
    delay: float = 0.0  # slow / slow_stream
    wrong: bytes = b""


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class _State:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # path -> responses started
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set on the per-server subclass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # keep pytest output clean

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        state = self.state
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append(Request("GET", self.path, range_header))
            route = state.routes.get(self.path)
            nth = state.served.get(self.path, 0)
            state.served[self.path] = nth + 1
        if route is None or route.behaviour == "404":
            self.send_error(404, "Not Found")
            return
        if route.behaviour == "500":
            self.send_error(500, "Internal Server Error")
            return

        data = route.wrong if route.behaviour == "wrong" else route.data
        start = 0
        if range_header and route.behaviour != "ignore_range":
            m = re.fullmatch(r"bytes=(\d+)-", range_header.strip())
            if m is None:
                self.send_error(400, "only open-ended byte ranges are supported")
                return
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

        if route.behaviour == "truncate":
            self._send(body[: len(body) // 2])
            self.close_connection = True
        elif route.behaviour == "drop_once" and nth == 0:
            self._send(body[: route.cut])
            self.close_connection = True
        elif route.behaviour == "slow":
            time.sleep(route.delay)
            self._send(body)
        elif route.behaviour == "slow_stream":
            for i in range(0, len(body), 1 << 16):
                self._send(body[i : i + (1 << 16)])
                time.sleep(route.delay)
        elif route.behaviour == "trickle":
            for i in range(len(body)):
                if not self._send(body[i : i + 1]):
                    return
                time.sleep(route.delay)
        else:
            self._send(body)

    def _send(self, payload: bytes) -> bool:
        """Send ``payload``; False when the client has gone (e.g. its timeout fired)."""
        try:
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


class FileServer:
    """``with FileServer() as s: s.add("/f.bin", data); urlopen(s.url("/f.bin"))``."""

    def __init__(self) -> None:
        self._state = _State()
        handler = type("Handler", (_Handler,), {"state": self._state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # a stalled "slow" handler must not block close
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def add(self, path: str, data: bytes, behaviour: str = "good", **kwargs: object) -> str:
        """Serve ``data`` at ``path`` with ``behaviour``; return its URL."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        self._state.routes[path] = Route(data, behaviour, **kwargs)  # type: ignore[arg-type]
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Request]:
        with self._state.lock:
            return list(self._state.requests)

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]


def free_port() -> int:
    """A port that nothing listens on right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def download_worker(hub_module: str, args: tuple, kwargs: dict, barrier, results) -> None:
    """Process target: wait at ``barrier``, call ``download(*args, **kwargs)``, report.

    ``hub_module`` is the download module's name (``unicom._hub``): importing it does not import
    torch (``unicom`` resolves its names lazily), so a spawned process starts fast.
    ``results`` receives ``("ok", path)`` or ``("error", repr)``.
    """
    hub = importlib.import_module(hub_module)
    barrier.wait(timeout=120)  # all ask at (nearly) the same moment
    try:
        results.put(("ok", hub.download(*args, **kwargs)))
    except BaseException as e:  # report every failure to the parent
        results.put(("error", repr(e)))
