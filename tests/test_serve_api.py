"""`unicom serve` over HTTP: the real command on 127.0.0.1 on a free port, each endpoint and each
error status, checked against the collection searched exactly in this process."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_server import TOKEN

@pytest.fixture(scope="module")
def small(served_collection):
    return served_collection[0]


@pytest.fixture(scope="module")
def server(served_collection):
    """One server for the API and browser tests, as it would be deployed: a token, two workers,
    uploads up to 1 MB, k up to 50 (see conftest.py)."""
    return served_collection[1]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url(), timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture(scope="module")
def exact(small):
    """Brute-force reference: (ids, float32 embeddings) of the searchable rows."""
    from unicom.collection import Collection

    return Collection.open(small.path).embeddings()


def assert_exact(results: list[dict], exact, vector: np.ndarray, k: int) -> None:
    """``results`` are the ``k`` best rows by brute force in float64 (ties in either order)."""
    ids, vectors = exact
    scores = np.minimum(vectors.astype(np.float64) @ (vector / np.linalg.norm(vector)), 1.0)  # as search caps them
    by_id = dict(zip(ids.tolist(), scores))
    assert len(results) == min(k, len(ids))
    assert [r["score"] for r in results] == pytest.approx(np.sort(scores)[::-1][:k].tolist(), abs=1e-5)
    assert [r["score"] for r in results] == pytest.approx([by_id[r["id"]] for r in results], abs=1e-5)


def upload(client, path, **fields):
    data = {name: str(value) for name, value in fields.items()}
    return client.post("/search", files={"image": (path.name, path.read_bytes(), "image/jpeg")}, data=data)


def png_bytes(size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return out.getvalue()


def test_health_and_info(client, small):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["count"] == len(small.ids) and info["dim"] == 32
    index = json.loads((small.path / "index.json").read_text())
    assert info["index"]["in_use"] and info["index"]["kind"] == index["kind"] == "flat"
    assert info["index"]["recall_at_k"] == index["recall_at_k"] and info["index"]["k"] == index["k"]
    assert info["model"].endswith("tiny.pt") and info["duplicates"] is True
    assert info["service"]["max_k"] == 50


def test_an_altered_copy_finds_its_original_first(client, small, exact):
    from unicom.collection import Collection

    expected = Collection.open(small.path).embed_images([Image.open(small.queries[5])])[0]
    body = upload(client, small.queries[5], k=5).json()
    assert_exact(body["results"], exact, expected, 5)
    assert body["results"][0]["id"] == small.ids["img_0005.png"] and body["took_ms"] > 0
    first = body["results"][0]
    assert first["image_path"].endswith("img_0005.png") and 0.9 < first["score"] <= 1.0 + 1e-5
    raw = client.post("/search?k=5", content=small.queries[5].read_bytes(), headers={"content-type": "image/jpeg"})
    assert [r["id"] for r in raw.json()["results"]] == [r["id"] for r in body["results"]]


def test_search_by_id_and_by_embedding(client, small, exact):
    ids, vectors = exact
    item = small.ids["img_0011.png"]
    by_id = client.post("/search", json={"id": item, "k": 7}).json()["results"]
    assert_exact(by_id, exact, vectors[list(ids).index(item)], 7)
    assert by_id[0]["id"] == item and by_id[0]["score"] == pytest.approx(1.0, abs=1e-3)
    scaled = (3 * vectors[list(ids).index(item)]).tolist()  # any length: the service normalises it
    by_vector = client.post("/search", json={"embedding": scaled, "k": 7}).json()["results"]
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_id]
    threshold = by_id[3]["score"]
    above = client.post("/search", json={"id": item, "k": 7, "min_score": threshold}).json()["results"]
    assert above == [r for r in by_id if r["score"] >= threshold] and len(above) >= 4
    assert len(client.post("/search", json={"id": item}).json()["results"]) == min(20, len(ids))  # default k
    most = client.post("/search", json={"id": item, "k": 50})  # --max-k 50 is allowed
    assert most.status_code == 200 and len(most.json()["results"]) == min(50, len(ids))


def test_concurrent_image_queries_get_their_own_answers(client, small):
    alone = {seed: upload(client, path, k=3).json()["results"] for seed, path in small.queries.items()}
    jobs = [seed for seed in small.queries for _ in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda seed: (seed, upload(client, small.queries[seed], k=3)), jobs))
    for seed, response in together:
        assert response.status_code == 200
        got = response.json()["results"]
        assert [r["id"] for r in got] == [r["id"] for r in alone[seed]]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in alone[seed]], abs=1e-5)


def test_image_and_thumbnail_are_served_by_id(client, small):
    item = small.ids["img_0007_small.jpg"]
    image = client.get(f"/image/{item}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == (small.images / "img_0007_small.jpg").read_bytes()
    png = client.get(f"/image/{small.ids['img_0002.png']}")
    assert png.headers["content-type"] == "image/png"
    thumb = client.get(f"/thumb/{small.ids['img_0002.png']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as decoded:
        assert decoded.format == "JPEG" and max(decoded.size) <= 256
    again = client.get(f"/thumb/{small.ids['img_0002.png']}", headers={"if-none-match": thumb.headers["etag"]})
    assert again.status_code == 304  # cached: the browser keeps its copy


def test_a_tar_member_is_served_from_its_shard(client, small):
    import tarfile

    with tarfile.open(small.path.parent / "shard.tar") as tar:
        expected = tar.extractfile("tar_0031.png").read()
    item = small.ids["tar_0031.png"]
    image = client.get(f"/image/{item}")
    assert image.status_code == 200 and image.content == expected and image.headers["content-type"] == "image/png"
    thumb = client.get(f"/thumb/{item}")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"


def test_duplicates_come_from_the_dedup_output(client, small):
    import pyarrow.parquet as pq

    body = client.get("/duplicates").json()
    table = pq.read_table(small.path / "dups.parquet").to_pylist()
    assert body["count"] == len(body["clusters"]) == len({row["cluster"] for row in table}) >= 2
    assert sorted(i["id"] for c in body["clusters"] for i in c["items"]) == sorted(row["id"] for row in table)
    for cluster in body["clusters"]:
        assert cluster["items"][0]["keep"] and sum(i["keep"] for i in cluster["items"]) == 1
    pairs = [{i["image_path"].rsplit("/", 1)[1] for i in c["items"]} for c in body["clusters"]]
    assert {"img_0003.png", "copy_of_3.png"} in pairs and {"img_0007.png", "img_0007_small.jpg"} in pairs


@pytest.mark.parametrize("path", [
    "/image/..%2F..%2F..%2Fetc%2Fpasswd", "/thumb/%2Fetc%2Fpasswd", "/image/3%2F..%2F..%2Fetc%2Fpasswd",
    "/image/-1", "/image/1.0", "/thumb/0x1", "/image/ 1", "/image/99999999999999999999999",
])
def test_a_path_looking_id_is_refused(client, path):
    response = client.get(path)
    assert response.status_code == 422 and "whole number" in response.json()["error"]
    assert b"root:" not in response.content


@pytest.mark.parametrize("request_args,status,words", [
    ({"json": {"id": 123456}}, 404, "no item has id 123456"),
    ({"json": {"id": 1, "k": 0}}, 422, "k must be"),
    ({"json": {"id": 1, "k": 51}}, 422, "from 1 to 50"),
    ({"json": {"id": 1, "k": "ten"}}, 422, "k must be"),
    ({"json": {"id": 1, "k": True}}, 422, "k must be"),
    ({"json": {"id": 1, "min_score": "high"}}, 422, "min_score"),
    ({"json": {"id": "../../etc/passwd"}}, 422, "whole number"),
    ({"json": {"id": -3}}, 422, "whole number"),
    ({"json": {"id": 1, "embedding": [0.0] * 32}}, 422, "exactly one of"),
    ({"json": {"k": 3}}, 422, "exactly one of"),
    ({"json": {"id": 1, "kk": 3}}, 422, "exactly one of"),
    ({"json": [1, 2]}, 422, "exactly one of"),
    ({"json": {"embedding": [1.0] * 31}}, 422, "list of 32 finite numbers"),
    ({"json": {"embedding": [0.0] * 32}}, 422, "not all zero"),
    ({"json": {"embedding": ["a"] * 32}}, 422, "finite numbers"),
    ({"content": b'{"embedding": [NaN' + b", 1" * 31 + b"]}", "headers": {"content-type": "application/json"}},
     422, "finite numbers"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "Content-Type 'text/plain'"),
    ({"files": {"image": ("a.txt", b"just text", "text/plain")}}, 400, "not an image"),
    ({"files": {"image": ("a.png", png_bytes()[:60], "image/png")}}, 400, "not an image"),
    ({"files": {"picture": ("a.png", png_bytes(), "image/png")}}, 422, "file field named 'image'"),
    ({"files": {"image": ("a.png", png_bytes(), "image/png")}, "data": {"k": "-2"}}, 422, "k must be"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ({"content": b"x" * (1200 << 10), "headers": {"content-type": "image/png"}}, 413, "larger than the limit of 1 MB"),
    ({"files": {"image": ("big.png", b"x" * (3 << 19), "image/png")}}, 413, "--max-upload-mb"),
])
def test_bad_searches_get_a_clear_json_error(client, request_args, status, words):
    response = client.post("/search", **request_args)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_a_body_without_length_is_cut_at_the_limit(client):
    def chunks():  # chunked transfer: no Content-Length to refuse it by, so the stream is counted
        for _ in range(17):  # 1 MB and one chunk: just over the limit
            yield b"y" * (64 << 10)

    response = client.post("/search", content=chunks(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 413


def test_unknown_ids_and_endpoints_are_404(client):
    for path in ("/image/123456", "/thumb/123456", "/nothing/here"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]
    assert client.get("/search").status_code == 405


def test_a_file_gone_from_disk_fails_alone(client, small, tmp_path):
    victim = small.images / "img_0020.png"
    item = small.ids[victim.name]
    moved = tmp_path / victim.name
    victim.rename(moved)
    try:
        for endpoint in ("image", "thumb"):
            response = client.get(f"/{endpoint}/{item}")
            assert response.status_code == 404 and "no longer" in response.json()["error"]
        victim.write_bytes(b"not a picture any more")
        response = client.get(f"/thumb/{item}")
        assert response.status_code == 404 and "can no longer be read" in response.json()["error"]
    finally:
        moved.replace(victim)
    assert client.get("/health").status_code == 200
    assert client.post("/search", json={"id": item, "k": 1}).json()["results"][0]["id"] == item


def test_the_page_and_its_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert client.get("/static/../app.py").status_code == 404


def test_the_token(server, small):
    with httpx.Client(base_url=server.url(), timeout=60) as client:
        assert client.get("/health").status_code == 200
        for path in ("/", "/info", "/thumb/1", "/image/1", "/duplicates", "/static/app.js"):
            response = client.get(path)
            assert response.status_code == 401 and "Bearer" in response.json()["error"], path
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/info", headers={"Authorization": TOKEN}).status_code == 401
        assert client.post("/search", json={"id": 1}).status_code == 401
        assert client.get("/?token=wrong").status_code == 401
        login = client.get(f"/?token={TOKEN}")  # a browser: the token becomes an HttpOnly cookie
        assert login.status_code == 303 and login.headers["location"] == "/"
        assert "httponly" in login.headers["set-cookie"].lower()
        assert client.get("/thumb/1").status_code == 200  # the client keeps the cookie
        assert client.get("/").status_code == 200


def test_bad_command_lines(tmp_path, capsys):
    from unicom.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "without --token" in err and "nope is not a folder" in err
    assert main(["serve", str(tmp_path)]) == 2 and "no manifest.json" in capsys.readouterr().err
    for flag, value in (("--port", "0"), ("--port", "70000"), ("--workers", "0"), ("--max-upload-mb", "-1"),
                        ("--max-k", "ten")):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(tmp_path), flag, value])
        assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_the_service_survived(client, server):
    """After every bad request above, the same process still answers."""
    assert client.get("/health").status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.output()
    assert "Started server process" in server.output()
