"""The library parts behind the programs, called as from a notebook: keyword parameters, no flags."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import synthetic_datasets as synth  # noqa: E402

import unicom  # noqa: E402
from unicom._utils import atomic_write, unwrap_model, write_json  # noqa: E402
from unicom.data import load_retrieval_dataset  # noqa: E402
from unicom.evaluate import embed_dataset, evaluate_retrieval  # noqa: E402
from unicom.metrics import retrieval_metrics  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning"),
              pytest.mark.usefixtures("one_thread")]


def test_atomic_write_is_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "record.json"
    write_json({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")

    def half_then_fail(f):
        f.write('{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail, "w")
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["record.json"]  # no temporary file left behind


def test_unwrap_model_sees_through_compile_and_ddp_wrappers():
    model = unicom.VisionTransformer(input_size=16, patch_size=8, dim=32, embedding_size=8, depth=1, num_heads=1)

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel and torch.compile expose
        def __init__(self, attribute: str, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, attribute, inner)

    assert unwrap_model(model) is model
    assert unwrap_model(Wrapper("module", Wrapper("_orig_mod", model))) is model


def test_evaluate_retrieval_with_keywords_matches_the_metrics_of_the_model_outputs(tmp_path, checkpoint):
    written = synth.make_cub(tmp_path, num_classes=6, per_class=3)
    model, transform = unicom.load(checkpoint, device="cpu")
    data = load_retrieval_dataset("cub", written.root, "test", transform)
    result = evaluate_retrieval(model, data.query, data.gallery, ks=(1, 2), num_feat=16, device="cpu",
                                batch_size=4, chunk_size=5)

    with torch.no_grad():  # the reference: the model on every image, in dataset order
        features = model(torch.stack([data.query[i][0] for i in range(len(data.query))]))
    labels = torch.as_tensor(data.query.labels)
    expected = retrieval_metrics(features[:, :16], labels, ks=(1, 2))
    assert {k: result.metrics[k] for k in expected} == expected
    assert torch.allclose(result.query.features, features, atol=1e-5)

    record = result.record()
    assert record["recall"] == {str(k): 100.0 * v for k, v in expected["recall"].items()}
    assert (record["num_query"], record["num_feat"], record["world_size"], record["skipped_images"]) == (9, 16, 1, 0)

    local = embed_dataset(model, data.query, batch_size=4, gather=False)  # one process: the whole set
    assert torch.equal(local.indices, torch.arange(9)) and torch.allclose(local.features, features, atol=1e-5)


def test_undecodable_gallery_images_are_counted_and_left_out(tmp_path, checkpoint):
    """In-Shop with one gallery file damaged: it is reported as skipped, is no row of the search,
    and the metrics are those of the good images (float64 brute force on embeddings computed
    independently of the library)."""
    from reference import embed_files, published_model, ref_retrieval

    written = synth.make_inshop(tmp_path / "data", train_items=1, test_items=3, per_item=2, gallery_only_items=1)
    bad = synth.make_bad_images(tmp_path / "bad")["truncated"]
    damaged = written.gallery[2]
    Path(damaged.path).write_bytes(bad.read_bytes())
    model, transform = unicom.load(checkpoint, device="cpu")
    data = load_retrieval_dataset("inshop", written.root, "test", transform, skip_bad_images=True)
    result = evaluate_retrieval(model, data.query, data.gallery, ks=(1, 2, 4), device="cpu", batch_size=4)

    good = [item for item in written.gallery if item is not damaged]
    assert result.metrics["skipped_images"] == 1
    assert (result.metrics["num_query"], result.metrics["num_gallery"]) == (6, 7)
    assert result.gallery.ok.all() and len(result.gallery.features) == 7
    items = sorted({i.key for i in written.test + written.gallery})
    (query_labels, gallery_labels) = ([items.index(i.key) for i in seq] for seq in (written.test, good))
    reference = published_model(checkpoint)
    expected = ref_retrieval(embed_files(reference, [i.path for i in written.test], 32), torch.tensor(query_labels),
                             embed_files(reference, [i.path for i in good], 32), torch.tensor(gallery_labels),
                             ks=(1, 2, 4))
    assert {k: result.metrics[k] for k in ("recall", "num_query", "num_gallery", "num_lone_queries")} == \
        {k: expected[k] for k in ("recall", "num_query", "num_gallery", "num_lone_queries")}
    assert result.metrics["map_at_r"] == pytest.approx(expected["map_at_r"], abs=1e-12)


def test_embed_loader_regroups_loader_batches_into_model_batches_without_losing_rows():
    """Loader batches of 3, 3, 3 and 2 rows into model batches of 4 (4, 4, then the last 3):
    every row once, in order, as the model gives it row by row."""
    from unicom.evaluate import embed_loader

    torch.manual_seed(0)
    model = unicom.VisionTransformer(input_size=16, patch_size=8, dim=32, embedding_size=8, depth=1, num_heads=1)
    images = torch.randn(11, 3, 16, 16)
    batches = [(images[s:s + n], torch.arange(s, s + n) % 3, torch.arange(s, s + n), torch.ones(n, dtype=torch.bool))
               for s, n in ((0, 3), (3, 3), (6, 3), (9, 2))]
    out = embed_loader(model, batches, torch.device("cpu"), batch_size=4, progress=False)
    with torch.no_grad():
        want = torch.cat([model.eval()(images[i:i + 1]) for i in range(11)])
    assert torch.equal(out.indices, torch.arange(11)) and torch.equal(out.labels, torch.arange(11) % 3)
    torch.testing.assert_close(out.features, want, rtol=1e-5, atol=1e-5)
