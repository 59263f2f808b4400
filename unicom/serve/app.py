"""The search service: a Starlette application, read-only over one collection.

``create_app(store, ServeOptions(...))`` builds it; :mod:`unicom.serve.server` runs it on
uvicorn. Every error is JSON, ``{"error": "..."}``, with its status:

===  ==================================================================================
400  the upload is not an image
401  ``--token`` is set and the request has no valid ``Authorization: Bearer`` header
404  no item has that id (or it was deleted); no duplicates file; no such endpoint
413  the request body is larger than ``--max-upload-mb``
415  ``/search`` with a body that is neither JSON, multipart nor an image
422  a bad query: ``k`` out of range, an id that is not a whole number, a malformed body
503  too many queries are waiting; try again
500  a bug: logged, answered, and the service goes on
===  ==================================================================================

Files are served by id only: the path comes from the collection's metadata, never from the
request, so no request can read a file outside the collection.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import mimetypes
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .batching import Batcher, Busy
from .images import NotAnImage, ThumbnailCache, decode_upload

__all__ = ["ServeOptions", "create_app"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "unicom_token"
_ID = re.compile(r"[0-9]{1,18}")  # a whole number that fits int64: nothing path-like gets through


@dataclass(frozen=True)
class ServeOptions:
    """What the service allows and how it batches; the command's flags set these."""

    token: str | None = None  # every endpoint but /health needs "Authorization: Bearer <token>"
    max_upload_mb: float = 20.0
    max_k: int = 1000
    default_k: int = 20
    batching: bool = True  # False: image queries run one at a time (the benchmark's peer)
    max_batch: int = 32
    # Seconds a batch waits for more queries once the first has come. 0: it takes the queries that
    # arrived while the previous batch ran, which is what batches grow from under load; a wait
    # idles the worker, which costs most when each call is short (id searches).
    max_wait: float = 0.0
    thumb_size: int = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Query:
    image: Any = None  # model input from store.preprocess (image queries)
    vector: np.ndarray | None = None  # (D,) float32, L2-normalised (id and embedding queries)
    k: int = 20
    min_score: float | None = None


def run_queries(store, queries: list[Query]) -> list[list[dict]]:
    """One batch: every image query embedded by one model call, then every query searched by one
    index call with the largest ``k``; each query's results cut to its own ``k`` and score."""
    images = [q.image for q in queries if q.vector is None]
    embedded = iter(store.embed(images)) if images else iter(())
    vectors = np.stack([q.vector if q.vector is not None else next(embedded) for q in queries])
    rows = store.search(vectors, max(q.k for q in queries))
    return [[hit for hit in row[:q.k] if q.min_score is None or hit["score"] >= q.min_score]
            for q, row in zip(queries, rows)]


def _parse_k(value: Any, options: ServeOptions) -> int:
    if value is None:
        return min(options.default_k, options.max_k)
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= options.max_k:
        raise ApiError(422, f"k must be a whole number from 1 to {options.max_k}, got {value!r}")
    return value


def _parse_score(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        score = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise ApiError(422, f"min_score must be a finite number (a cosine similarity), got {value!r}")
    return score


def _parse_id(value: Any) -> int:
    if isinstance(value, str) and _ID.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ApiError(422, f"an id is a whole number (an item of the collection), got {value!r}")


class Service:
    """The endpoints, over ``store`` (a :class:`unicom.serve.backend.CollectionBackend`)."""

    def __init__(self, store, options: ServeOptions) -> None:
        self.store, self.options = store, options
        self.thumbs = ThumbnailCache(options.thumb_size)
        self.batcher = Batcher(lambda queries: run_queries(store, queries),
                               max_batch=options.max_batch if options.batching else 1, max_wait=options.max_wait)
        self.max_bytes = int(options.max_upload_mb * (1 << 20))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        info = await run_in_threadpool(self.store.info)
        info["service"] = {"max_k": self.options.max_k, "default_k": self.options.default_k,
                           "max_upload_mb": self.options.max_upload_mb, "batching": self.options.batching,
                           "max_batch": self.batcher.max_batch, "batches": self.batcher.batches,
                           "queries": self.batcher.jobs}
        return JSONResponse(info)

    async def search(self, request: Request) -> Response:
        started = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await self._read_body(request)
        if kind == "application/json":
            query = await self._json_query(body)
        elif kind == "multipart/form-data":
            query = await self._multipart_query(request.headers, body, request.query_params)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            query = await self._image_query(body, request.query_params)
        else:
            raise ApiError(415, f"expected a JSON body ({{\"id\": N}} or {{\"embedding\": [...]}}), a multipart "
                                f"upload with an 'image' file, or an image body; got Content-Type {kind or 'none'!r}")
        try:
            results = await self.batcher.submit(query)
        except Busy as error:
            raise ApiError(503, str(error)) from None
        return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - started) * 1000, 3)})

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (not after reading it all)."""
        too_large = ApiError(413, f"the request body is larger than the limit of {self.options.max_upload_mb:g} MB "
                                  f"(--max-upload-mb)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _json_query(self, body: bytes) -> Query:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(422, f"the body is not valid JSON ({error})") from None
        allowed = {"id", "embedding", "k", "min_score"}
        if not isinstance(data, dict) or len({"id", "embedding"} & data.keys()) != 1 or data.keys() - allowed:
            raise ApiError(422, 'expected a JSON object with exactly one of "id" or "embedding", and optionally '
                                f'"k" and "min_score"; got {_preview(data)}')
        k, min_score = _parse_k(data.get("k"), self.options), _parse_score(data.get("min_score"))
        if "id" in data:
            vector = await run_in_threadpool(self._vector, _parse_id(data["id"]))
        else:
            vector = self._embedding(data["embedding"])
        return Query(vector=vector, k=k, min_score=min_score)

    def _vector(self, item_id: int) -> np.ndarray:
        try:
            return self.store.vector(item_id)
        except KeyError:
            raise ApiError(404, f"no item has id {item_id} in this collection") from None

    def _embedding(self, value: Any) -> np.ndarray:
        dim = self.store.dim
        expected = f"embedding must be a list of {dim} finite numbers, not all zero"
        if not isinstance(value, list) or len(value) != dim or any(isinstance(x, bool) for x in value):
            raise ApiError(422, f"{expected}; got {_preview(value)}")
        try:
            vector = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ApiError(422, f"{expected}; got {_preview(value)}") from None
        norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else 0.0
        if vector.ndim != 1 or not norm > 0:
            raise ApiError(422, f"{expected}; got {_preview(value)}")
        return (vector / norm).astype(np.float32)  # scores are cosines whatever the length sent

    async def _multipart_query(self, headers: Headers, body: bytes, params) -> Query:
        async def stream():
            yield body

        try:
            form = await MultiPartParser(headers, stream(), max_files=1, max_fields=8).parse()
        except MultiPartException as error:
            raise ApiError(422, f"malformed multipart body ({error.message})") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "expected the image as a file field named 'image'")
            data = await upload.read()
            fields = {name: form.get(name, params.get(name)) for name in ("k", "min_score")}
            return await self._image_query(data, fields)
        finally:
            await form.close()

    async def _image_query(self, data: bytes, fields) -> Query:
        k, min_score = _parse_k(fields.get("k"), self.options), _parse_score(fields.get("min_score"))
        try:
            model_input = await run_in_threadpool(lambda: self.store.preprocess(decode_upload(data)))
        except NotAnImage as error:
            raise ApiError(400, str(error)) from None
        return Query(image=model_input, k=k, min_score=min_score)

    def _source(self, request: Request):
        item_id = _parse_id(request.path_params["id"])
        try:
            return self.store.image_source(item_id)
        except KeyError:
            raise ApiError(404, f"no item has id {item_id} in this collection") from None
        except OSError:
            raise ApiError(404, f"the image of item {item_id} is no longer on disk") from None

    async def image(self, request: Request) -> Response:
        source = await run_in_threadpool(self._source, request)
        media_type = mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        headers = {"Cache-Control": "private, max-age=3600"}
        if source.path is not None:
            return FileResponse(source.path, media_type=media_type, headers=headers)
        return Response(await run_in_threadpool(source.read), media_type=media_type, headers=headers)

    async def thumb(self, request: Request) -> Response:
        source = await run_in_threadpool(self._source, request)
        try:
            data, etag = await run_in_threadpool(self.thumbs.get, source)
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # the file changed since it was embedded
            raise ApiError(404, f"the image of item {source.key[0]} can no longer be read ({error})") from None
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    async def duplicates(self, request: Request) -> Response:
        clusters = await run_in_threadpool(self.store.duplicates)
        if clusters is None:
            raise ApiError(404, "this collection has no duplicates file yet: run `unicom dedup COL` first")
        return JSONResponse({"clusters": clusters, "count": len(clusters)})

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _preview(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class TokenMiddleware:
    """``Authorization: Bearer <token>`` on every request but ``/health``.

    A browser cannot add that header to a page load or an ``<img>``: opening ``/?token=<token>``
    once sets the same token as an HttpOnly, SameSite=Strict cookie (and redirects to ``/``, so the
    token leaves the address bar), which the middleware accepts as well.
    """

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token.encode()

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        request = Request(scope)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header[:7].lower() == "bearer " else None
        cookie = SimpleCookie(request.headers.get("cookie", "")).get(COOKIE)
        if self._valid(bearer) or (cookie is not None and self._valid(cookie.value)):
            return await self.app(scope, receive, send)
        if scope["path"] == "/" and self._valid(request.query_params.get("token")):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, request.query_params["token"], httponly=True, samesite="strict")
            return await response(scope, receive, send)
        message = ("missing or wrong bearer token: send 'Authorization: Bearer TOKEN' (the --token of "
                   "`unicom serve`); in a browser, open /?token=TOKEN once")
        response = JSONResponse({"error": message}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def _api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse({"error": error.message}, status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    message = "no such endpoint" if error.status_code == 404 else error.detail
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)


async def _server_error(request: Request, error: Exception) -> Response:
    logger.exception("request %s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse({"error": f"internal error ({type(error).__name__}: {error}); the service goes on"},
                        status_code=500)


def create_app(store, options: ServeOptions | None = None) -> Starlette:
    """The ASGI application over ``store`` (a :class:`unicom.serve.backend.CollectionBackend`)."""
    options = options or ServeOptions()
    service = Service(store, options)

    @asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        yield
        await service.batcher.stop()

    routes = [
        Route("/", service.page),
        Route("/health", service.health),
        Route("/info", service.info),
        Route("/search", service.search, methods=["POST"]),
        Route("/image/{id:path}", service.image),
        Route("/thumb/{id:path}", service.thumb),
        Route("/duplicates", service.duplicates),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    middleware = [Middleware(TokenMiddleware, token=options.token)] if options.token else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    return app
