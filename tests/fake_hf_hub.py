"""A small Hugging Face Hub on 127.0.0.1 for the real ``huggingface_hub`` client (no network).

It speaks the parts of the Hub's HTTP interface that ``hf_hub_download`` and
``HfApi.create_repo`` / ``upload_folder`` use, as huggingface_hub's ``file_download.py``,
``_commit_api.py`` and ``lfs.py`` call them:

* ``HEAD`` / ``GET /{org}/{name}/resolve/{revision}/{path}``: a small file is answered directly
  (``ETag``: its git blob id, ``X-Repo-Commit``); a large (LFS) file is a 302 to the "CDN" host
  ``localhost`` (another host than the endpoint's 127.0.0.1, as the Hub's CDN is), with the
  metadata on the redirect itself: ``X-Linked-Etag`` (the SHA-256), ``X-Linked-Size``,
  ``X-Repo-Commit``. Missing repositories, revisions and files get 404 with the Hub's
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
* ``GET /lfs/{sha256}``: the CDN; ``corrupt(oid, data)`` makes it serve other bytes.
* ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}``,
  ``POST /{repo}.git/info/lfs/objects/batch`` (the git-lfs batch API, ``basic`` transfer),
  ``PUT /lfs-upload/{sha256}`` and ``POST /api/models/{repo}/commit/{rev}`` (an NDJSON body).

Xet storage is not spoken: set ``HF_HUB_DISABLE_XET=1`` so that the client uses LFS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pt", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> {path: bytes}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id

    def resolve(self, revision: str) -> str | None:
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class FakeHub:
    """``with FakeHub() as hub``: a Hub at ``hub.endpoint``; ``hub.requests`` logs (method, path)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes (LFS storage)
        self.corrupted: dict[str, bytes] = {}  # sha256 -> what the CDN serves instead
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0

    # -------------------------------------------------------------- test side

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit on ``branch`` (the repository is created if needed) holding the parent's
        files updated by ``files``; returns its 40-hex id."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo())
            parent = repo.commits.get(repo.branches.get(branch, ""), {})
            self._counter += 1
            oid = hashlib.sha1(f"{repo_id}:{self._counter}".encode()).hexdigest()
            repo.commits[oid] = {**parent, **files}
            repo.branches[branch] = oid
            for path, data in files.items():
                if path.endswith(LFS_SUFFIXES):
                    self.blobs[hashlib.sha256(data).hexdigest()] = data
            return oid

    def corrupt(self, sha256: str, data: bytes) -> None:
        self.corrupted[sha256] = data

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_PREUPLOAD = re.compile(r"^/api/models/([^/]+/[^/]+)/preupload/([^/]+)$")
_COMMIT = re.compile(r"^/api/models/([^/]+/[^/]+)/commit/([^/]+)$")
_LFS_BATCH = re.compile(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass

    # -------------------------------------------------------------- helpers

    def _path(self) -> str:
        return unquote(urlsplit(self.path).path)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False, **headers: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                    **headers}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _log(self) -> None:
        with self.hub.lock:
            self.hub.requests.append((self.command, self._path()))

    # -------------------------------------------------------------- downloads

    def _resolve(self, head: bool) -> None:
        path = self._path()
        if path.startswith("/lfs/"):
            oid = path[len("/lfs/"):]
            data = self.hub.corrupted.get(oid, self.hub.blobs.get(oid))
            if data is None:
                self._send(404, head=head)
            else:
                self._send(200, data, {"ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}, head=head)
            return
        m = _RESOLVE.match(path)
        if m is None:
            self._send(404, head=head)
            return
        repo_id, revision, filename = m.groups()
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id", head)
            return
        data = repo.commits[commit].get(filename)
        if data is None:
            self._error(404, "EntryNotFound", "Entry not found", head, **{"X-Repo-Commit": commit})
            return
        if filename.endswith(LFS_SUFFIXES):
            oid = hashlib.sha256(data).hexdigest()
            self._send(302, b"", {"Location": f"{self.hub.cdn}/lfs/{oid}", "X-Repo-Commit": commit,
                                  "ETag": f'"{git_blob_id(data)}"', "X-Linked-Etag": f'"{oid}"',
                                  "X-Linked-Size": str(len(data))}, head=head)
            return
        self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"',
                               "Content-Type": "application/octet-stream"}, head=head)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._log()
        self._resolve(head=True)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._log()
        self._resolve(head=False)

    # -------------------------------------------------------------- uploads

    def do_PUT(self) -> None:  # noqa: N802 - stdlib name
        self._log()
        path, data = self._path(), self._body()
        oid = path[len("/lfs-upload/"):] if path.startswith("/lfs-upload/") else None
        if oid is None or hashlib.sha256(data).hexdigest() != oid:
            self._send(400, b"upload does not match its oid")
            return
        with self.hub.lock:
            self.hub.blobs[oid] = data
        self._send(200)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._log()
        path, body = self._path(), self._body()
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            if repo_id in self.hub.repos:  # the Hub's 409 names the repository too
                self._send(409, json.dumps({"error": "You already created this model repo",
                                            "url": f"{self.hub.endpoint}/{repo_id}"}).encode(),
                           {"Content-Type": "application/json"})
                return
            self.hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})
        elif path == "/api/validate-yaml":
            self._json(200, {"errors": [], "warnings": []})
        elif (m := _PREUPLOAD.match(path)) is not None:
            if m.group(1) not in self.hub.repos:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            files = json.loads(body)["files"]
            self._json(200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                        "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                                       for f in files]})
        elif (m := _LFS_BATCH.match(path)) is not None:
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.hub.blobs:
                    entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects})
        elif (m := _COMMIT.match(path)) is not None:
            self._commit(m.group(1), unquote(m.group(2)), body)
        else:
            self._send(404)

    def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
        if repo_id not in self.hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        files: dict[str, bytes] = {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.hub.blobs.get(value["oid"])
                if data is None:
                    self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    return
                files[value["path"]] = data
        oid = self.hub.commit(repo_id, files, branch)
        self._json(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})
