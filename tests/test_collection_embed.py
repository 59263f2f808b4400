"""`unicom embed` and search on real image files with a tiny random model: the collection files,
bad files, incremental runs, a second model, SIGKILL and resume, two gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from collection_images import altered, draw, write_folder
from dist_utils import run_in_processes

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(batch_size=8, num_workers=0, device="cpu", decode="exact")


def embed(sources, output, checkpoint, **kw):
    from unicom.collection.embed import embed_collection

    return embed_collection([str(s) for s in sources], output, checkpoint, **{**OPTIONS, **kw})


def snapshot(folder: Path) -> tuple[list, np.ndarray]:
    """(metadata rows, embeddings) of every part, for comparing two collections."""
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [p["part"] for p in manifest["parts"]]
    rows = sum((pq.read_table(folder / "metadata" / f"metadata_{p}.parquet").to_pylist() for p in parts), [])
    embeddings = np.concatenate([np.load(folder / "img_emb" / f"img_emb_{p}.npy") for p in parts])
    return rows, embeddings


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_folder(folder / "a", range(12))
    write_folder(folder / "b", range(12, 20), fmt="jpg")
    (folder / "b" / "truncated.jpg").write_bytes((folder / "b" / "img_0012.jpg").read_bytes()[:200])
    (folder / "b" / "fake.png").write_text("not an image")
    (folder / "b" / "notes.txt").write_text("a caption")
    return folder


@pytest.fixture(scope="module")
def base(images, checkpoint, tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("col") / "col"
    summary = embed([images], output, checkpoint)
    return output, summary


def test_collection_files(base, images):
    output, summary = base
    assert summary.embedded == 20 and summary.deleted == 0
    assert summary.skipped["could not be decoded"] == 2 and summary.skipped["not an image file (.txt)"] == 1
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["normalised"] is True and manifest["embedding_size"] == 32
    assert len(manifest["checkpoint_sha256"]) == 64
    assert manifest["counts"] == {"rows": 22, "embedded": 20, "errors": 2, "deleted": 0}
    rows, embeddings = snapshot(output)
    assert embeddings.dtype == np.float16 and embeddings.shape == (22, 32)
    assert [r["id"] for r in rows] == list(range(22))
    by_name = {Path(r["image_path"]).name: r for r in rows}
    assert by_name["truncated.jpg"]["error"] and by_name["fake.png"]["error"]
    good = by_name["img_0003.png"]
    assert good["error"] is None and (good["width"], good["height"]) == (96, 96)
    import hashlib

    assert good["sha256"] == hashlib.sha256(Path(good["image_path"]).read_bytes()).hexdigest()
    ok = np.array([r["error"] is None for r in rows])
    np.testing.assert_allclose(np.linalg.norm(embeddings[ok].astype(np.float32), axis=1), 1, atol=2e-3)


def test_altered_copy_finds_its_original(base, tmp_path):
    from unicom.collection import Collection

    output, _ = base
    collection = Collection.open(output, device="cpu")
    assert len(collection) == 20
    queries = []
    for how in ("jpeg", "downscale", "brightness"):
        path = tmp_path / f"q_{how}.png"
        altered(draw(5), how).save(path)
        queries.append(path)
    for results in collection.search(queries, k=3):
        assert Path(results[0]["image_path"]).name == "img_0005.png"
        assert set(results[0]) == {"id", "image_path", "score"}
        assert results[0]["score"] >= results[1]["score"]
    assert collection.search_ids([4], k=1)[0][0]["id"] == 4
    every = collection.search(collection.embeddings()[1][:1], k=50)[0]
    assert len(every) == 20 and all(not Path(r["image_path"]).name.startswith(("fake", "trunc")) for r in every)


def test_incremental_add_change_delete(base, images, checkpoint, tmp_path, one_thread):
    from unicom.collection import Collection

    source = tmp_path / "images"
    shutil.copytree(images, source)
    output = tmp_path / "col"
    embed([source], output, checkpoint)
    before = {Path(r["image_path"]).name: r["id"] for r in snapshot(output)[0]}
    draw(100).save(source / "a" / "new.png")  # added
    draw(101).save(source / "a" / "img_0001.png")  # changed
    (source / "a" / "img_0002.png").unlink()  # deleted
    os.utime(source / "a" / "img_0003.png", (1, 1))  # touched: same bytes
    summary = embed([source], output, checkpoint)
    # unchanged: 17 images and the two undecodable files
    assert (summary.embedded, summary.deleted, summary.unchanged) == (2, 1, 20)
    rows = snapshot(output)[0]
    live = {Path(r["image_path"]).name: r["id"] for r in rows if not r["deleted"]}
    assert live["img_0003.png"] == before["img_0003.png"] and live["img_0004.png"] == before["img_0004.png"]
    assert live["img_0001.png"] not in before.values() and "img_0002.png" not in live
    assert sorted(r["id"] for r in rows if r["deleted"]) == sorted([before["img_0001.png"], before["img_0002.png"]])
    collection = Collection.open(output)
    found = {r["id"] for r in collection.search(collection.embeddings()[1][:1], k=100)[0]}
    assert before["img_0002.png"] not in found and before["img_0001.png"] not in found and len(found) == 20
    again = embed([source], output, checkpoint)
    assert (again.embedded, again.deleted) == (0, 0)


def test_second_model_is_refused(base, images, tmp_path):
    import torch

    import unicom
    from unicom.checkpoint import save_model

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_model(unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2,
                                        num_heads=2), other)
    output, _ = base
    with pytest.raises(ValueError, match="was embedded with .*use another --output"):
        embed([images], output, str(other))


def test_a_checkpoint_changed_since_embedding_is_refused_for_queries(checkpoint, tmp_path, one_thread):
    import torch

    import unicom
    from unicom.checkpoint import save_model
    from unicom.collection import Collection

    model = tmp_path / "tiny.pt"
    shutil.copy(checkpoint, model)
    query = write_folder(tmp_path / "few", range(3))[1]
    embed([tmp_path / "few"], tmp_path / "col", str(model))
    assert Collection.open(tmp_path / "col", device="cpu").search([query], 1)[0][0]["image_path"] == str(query)
    torch.manual_seed(1)  # retrained in place: same path, other weights
    save_model(unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2,
                                        num_heads=2), model)
    with pytest.raises(ValueError, match="has changed since .* was embedded"):
        Collection.open(tmp_path / "col", device="cpu").search([query], 1)


def test_tar_source(images, checkpoint, tmp_path, one_thread):
    from unicom.collection import Collection

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for path in sorted((images / "a").glob("*.png"))[:4]:
            archive.add(path, arcname=f"{path.stem}.png")
            archive.add(images / "b" / "notes.txt", arcname=f"{path.stem}.txt")
    summary = embed([str(tmp_path / "{sha,s}*.tar")], tmp_path / "col", checkpoint)
    assert summary.embedded == 4 and summary.skipped["not an image file (.txt)"] == 4
    collection = Collection.open(tmp_path / "col")
    hit = collection.search([str(images / "a" / "img_0002.png")], k=1)[0][0]
    assert hit["image_path"] == f"{shard}/img_0002.png" and hit["score"] > 0.999


def _embed_in_group(rank, world_size, images, output, checkpoint):
    from unicom.collection.embed import embed_collection

    embed_collection([images], output, checkpoint, part_size=7, **OPTIONS)
    return rank


def test_two_processes_equal_one(images, checkpoint, tmp_path, one_thread):
    embed([images], tmp_path / "one", checkpoint, part_size=7)
    run_in_processes(_embed_in_group, 2, str(images), str(tmp_path / "two"), checkpoint)
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one[0] == two[0]
    np.testing.assert_allclose(one[1].astype(np.float32), two[1].astype(np.float32), atol=1e-3)


def test_sigkill_then_rerun_equals_one_run(images, checkpoint, tmp_path):
    args = [sys.executable, "-m", "unicom", "embed", str(images), "--model", checkpoint, "--device", "cpu",
            "--num-workers", "0", "--batch-size", "2", "--part-size", "1"]  # many parts: the kill lands mid-run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen([*args, "--output", str(killed)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        manifest = killed / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["parts"]) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts = len(json.loads((killed / "manifest.json").read_text())["parts"])
    assert parts >= 2, "the run should have written parts before it was killed"
    for output in (killed, tmp_path / "whole"):
        result = subprocess.run([*args, "--output", str(output)], env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
    whole_parts = len(json.loads((tmp_path / "whole" / "manifest.json").read_text())["parts"])
    assert parts < whole_parts, "the run should have been killed part-way"
    a, b = snapshot(killed), snapshot(tmp_path / "whole")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_int8_embedding_is_recorded_and_close_to_fp32(images, checkpoint, tmp_path, caplog, one_thread):
    """`unicom embed --precision int8` (CPUs): the manifest lists the precision, the vectors stay
    within the int8 mode's cosine bound of fp32's, and adding rows with another precision is said."""
    pytest.importorskip("onnxruntime")
    from unicom.collection import Collection

    fp32 = embed([images], tmp_path / "fp32", checkpoint)
    int8 = embed([images], tmp_path / "int8", checkpoint, precision="int8")
    assert int8.embedded == fp32.embedded
    (ids_a, a), (ids_b, b) = [Collection.open(tmp_path / name).embeddings() for name in ("fp32", "int8")]
    assert np.array_equal(ids_a, ids_b)
    cosine = (a.astype(np.float64) * b.astype(np.float64)).sum(1)  # both stored L2-normalised
    assert cosine.min() >= 0.998
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["precisions"] == ["int8"]
    extra = tmp_path / "extra"
    write_folder(extra, range(40, 42))
    with caplog.at_level("WARNING"):
        embed([images, extra], tmp_path / "int8", checkpoint)
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["precisions"] == ["int8", "fp32"]
    assert "this run adds rows with fp32" in caplog.text
