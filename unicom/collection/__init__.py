"""Your own collections of images: embed, index, search and deduplicate them.

The ``unicom`` command (``unicom embed | index | search | dedup``) and this package do the same
work; the command is a thin layer over the functions here.

The API others may rely on (stable)::

    from unicom.collection import Collection

    col = Collection.open("COL")            # a folder written by `unicom embed ... --output COL`
    len(col)                                # searchable rows (embedded, not deleted)
    col.search(["query.jpg"], k=10)         # image paths or PIL images (embedded with the
                                            #   collection's model), or a (Q, D) / (D,) array of
                                            #   embeddings: one list per query, best first, of
                                            #   {"id": int, "image_path": str, "score": float}
                                            #   (cosine similarity); deleted and undecodable rows
                                            #   are never returned
    col.search_ids([3, 7], k=10)            # stored rows as queries (each finds itself first)
    col.embed_images(images)                # (Q, D) float32 L2-normalised query embeddings
    col.embeddings()                        # (ids (N,), (N, D) float32) of the searchable rows
    col.ids()                               # (N,) int64 ids of the searchable rows
    col.row(id)                             # one row's metadata as a dict (None if unknown)
    col.metadata()                          # pyarrow Table of every row, deleted ones too
    col.manifest                            # manifest.json as a dict (model, embedding_size, counts)
    col.reload()                            # read again after embed/index changed the folder

Files of a collection folder ``COL``:

* ``COL/manifest.json``, ``COL/img_emb/img_emb_N.npy`` (float16, L2-normalised),
  ``COL/metadata/metadata_N.parquet`` (image_path, id, size, mtime, sha256, width, height,
  error, deleted): see :mod:`.store`; clip-retrieval's and autofaiss' names.
* ``COL/index.faiss`` and ``COL/index.json`` (factory string, parameters, measured recall@k,
  p50/p99 latency), written by ``unicom index`` (:func:`.index.build_index`); search uses them
  when they are up to date with the collection, and searches exactly otherwise.
* ``COL/dups.parquet`` (cluster, id, image_path, score, keep), written by ``unicom dedup``
  (:func:`.dedup.dedup_collection`).

Row ids are stable: a file that does not change keeps its id across ``embed`` runs; a changed
file gets a new id and its old row is marked deleted.
"""

from .api import Collection

__all__ = ["Collection"]
