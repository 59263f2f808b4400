"""``unicom serve COL``: a search service and a web page over a collection.

A Starlette application on uvicorn, read-only over the collection: ``/search`` (an uploaded
image, a stored item's id, or an embedding), ``/image/{id}`` and ``/thumb/{id}`` (served by id
only), ``/duplicates``, ``/info``, ``/health``, and one plain HTML/CSS/JS page at ``/``.

* :mod:`.app`: ``create_app(backend, ServeOptions(...))``, the endpoints and their errors;
* :mod:`.batching`: concurrent queries run as one batch through a short queue;
* :mod:`.backend`: what the service reads from a :class:`unicom.collection.Collection`;
* :mod:`.server`: ``serve(COL, host=..., port=...)`` on uvicorn, one process or several;
* :mod:`.cli`: the ``serve`` subcommand of ``unicom``.

Importing this package imports nothing else (the command's parser stays fast).
"""
