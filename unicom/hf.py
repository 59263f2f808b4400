"""Model folders for the Hugging Face Hub: load ``hf-hub:org/name[@revision]``, save and publish.

A model folder holds three files, as timm and open_clip lay theirs out:

* ``config.json``: the architecture (``model_config``, the :class:`~unicom.model.ViTConfig`
  fields), ``embedding_size`` and the eval transform's ``input_size`` and normalisation;
* ``model.safetensors``: the weights, written by :func:`unicom.checkpoint.save_model` (its
  metadata holds the config and a SHA-256 of config and tensors, checked on every load);
* ``README.md``: a model card with the architecture, the training settings when known and the
  results when given.

Downloads, the cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``), the
endpoint (``HF_ENDPOINT``) and the token (``HF_TOKEN`` or ``hf auth login``) are huggingface_hub's
own: this module only asks it for the two files, and huggingface_hub is imported on first use.
A downloaded file is read with the same checks as a local one (:mod:`unicom.checkpoint`).

Turn a fine-tuning checkpoint into a folder (its ``results.json``, when beside it, goes into
the card)::

    python -m unicom.hf export runs/sop/model_best.pt my-model/ [--results runs/sop/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ._utils import atomic_write, unwrap_model, write_json
from .checkpoint import CheckpointError, save_model
from ._hub import DownloadError
from .model import ViTConfig
from .transforms import MEAN, STD

__all__ = ["HUB_PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "model_folder_files", "save_pretrained", "push_to_hub",
           "main"]

HUB_PREFIX = "hf-hub:"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
_ARCHITECTURE = "unicom.VisionTransformer"


# ----------------------------------------------------------------------------- loading


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local folder holding a config.json (a folder :func:`save_pretrained` wrote)."""
    return bool(str(path).strip()) and (Path(path).expanduser() / CONFIG_NAME).is_file()


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@revision]`` -> (``org/name``, revision or None)."""
    repo, _, revision = name[len(HUB_PREFIX):].partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(part.strip() for part in parts) or (revision == "" and "@" in name):
        raise ValueError(f"{name!r}: expected hf-hub:<org>/<name> or hf-hub:<org>/<name>@<revision>")
    return repo, revision or None


def model_folder_files(name_or_path: str | os.PathLike,
                       cache_dir: str | os.PathLike | None = None) -> tuple[Path, ViTConfig]:
    """(the weights file, the architecture its config.json describes) of a local model folder or
    of ``hf-hub:org/name[@revision]``, downloaded through huggingface_hub into its cache
    (``cache_dir``: another cache folder)."""
    if isinstance(name_or_path, str) and name_or_path.startswith(HUB_PREFIX):
        repo, revision = parse_hub_name(name_or_path)
        config_path = _hub_file(name_or_path, repo, revision, CONFIG_NAME, cache_dir)
        config = read_config(config_path)
        weights = _hub_file(name_or_path, repo, revision, WEIGHTS_NAME, cache_dir)
    else:
        folder = Path(name_or_path).expanduser()
        config = read_config(folder / CONFIG_NAME)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has a {CONFIG_NAME} but no {WEIGHTS_NAME}")
    _check_recorded_config(weights, config)
    return weights, config


def _hub_file(name: str, repo: str, revision: str | None, filename: str, cache_dir) -> Path:
    """One file of a Hub repository through ``hf_hub_download``; its errors become one clear line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                    library_name="unicom"))
    except RepositoryNotFoundError:
        reason = (f"repository {repo} not found (a private or gated repository needs a token: "
                  "HF_TOKEN or `hf auth login`)")
    except RevisionNotFoundError:
        reason = f"revision {revision!r} not found in {repo}"
    except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
        reason = (f"{filename} is not in the Hugging Face cache and the Hub cannot be reached "
                  "(HF_HUB_OFFLINE is set, or no network): download it once while online")
    except EntryNotFoundError:
        reason = f"{repo} has no {filename}: not a unicom model folder (see unicom.save_pretrained)"
    except (OSError, ValueError) as error:  # HTTP errors, a size mismatch, a full disk
        reason = f"{filename}: {' '.join(str(error).split())[:300]}"
    raise DownloadError(f"{name}: {reason}")


def read_config(path: Path) -> ViTConfig:
    """The architecture in a model folder's config.json; a CheckpointError names what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = ViTConfig(**data["model_config"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON file ({error})") from None
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} does not describe a unicom model: expected a 'model_config' with the "
                              f"VisionTransformer fields ({type(error).__name__}: {error})") from None
    for key in ("embedding_size", "input_size"):
        if key in data and data[key] != getattr(config, key):
            raise CheckpointError(f"{path}: {key} {data[key]!r} disagrees with model_config's "
                                  f"{getattr(config, key)!r}")
    return config


def _check_recorded_config(weights: Path, config: ViTConfig) -> None:
    """A config recorded in the weights' own metadata must be config.json's (the header alone is read)."""
    from .checkpoint import _CONFIG_KEY, _damaged
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            recorded = (f.metadata() or {}).get(_CONFIG_KEY)
    except Exception as error:  # noqa: BLE001 - a damaged header fails in several ways
        raise _damaged(weights, f"not a readable .safetensors file ({' '.join(str(error).split())[:200]})") from None
    if recorded is not None:
        try:
            same = ViTConfig(**json.loads(recorded)) == config
        except (TypeError, ValueError):
            same = False
        if not same:
            raise CheckpointError(f"{weights}: the config recorded in the weights differs from {CONFIG_NAME} "
                                  f"({recorded[:200]})")


# ----------------------------------------------------------------------------- saving


def folder_config(config: ViTConfig) -> dict:
    """The config.json of a model folder."""
    return {
        "architecture": _ARCHITECTURE,
        "library_name": "unicom",
        "model_config": config.to_dict(),
        "embedding_size": config.embedding_size,
        "input_size": config.input_size,
        # The eval transform unicom.load returns: bicubic resize of the shorter side, center crop.
        "preprocess": {"resize": config.input_size, "crop": config.input_size, "interpolation": "bicubic",
                       "mean": list(MEAN), "std": list(STD)},
    }


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike, *,
                    results: str | os.PathLike | dict | None = None, settings: dict | None = None) -> Path:
    """Write ``model`` as a Hub model folder: config.json, model.safetensors and a README.md card.

    ``results``: a ``results.json`` written by ``retrieval.py`` (or its dict), shown in the card;
    its ``settings`` (the fine-tuning flags) are shown too unless ``settings`` is given. Files
    are written atomically; other files in ``folder`` are left alone. Returns the folder.
    ``unicom.load(folder)`` and, once pushed, ``unicom.load("hf-hub:org/name")`` rebuild the model.
    """
    return _write_folder(model, Path(folder), results, settings)


def _write_folder(model: torch.nn.Module, folder: Path, results, settings, repo_id: str | None = None) -> Path:
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if not isinstance(config, ViTConfig):
        raise TypeError(f"expected a unicom VisionTransformer, got {type(model).__name__}")
    if results is not None and not isinstance(results, dict):
        path = Path(results)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"results {path}: expected a results.json file ({error})") from None
        if not isinstance(results, dict):
            raise ValueError(f"results {path}: expected a JSON object")
    if settings is None and results is not None and isinstance(results.get("settings"), dict):
        settings = results["settings"]
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: expected a folder to write the model into")
    save_model(model, folder / WEIGHTS_NAME)
    write_json(folder_config(config), folder / CONFIG_NAME)
    card = model_card(config, results, settings, repo_id)
    atomic_write(folder / CARD_NAME, lambda f: f.write(card), "w")
    return folder


def _table(rows: list[tuple[str, Any]], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {'' if v is None else v} |" for k, v in rows]
    return "\n".join(lines)


def _number(value: Any) -> Any:
    return f"{value:.2f}" if isinstance(value, float) else value


def model_card(config: ViTConfig, results: dict | None = None, settings: dict | None = None,
               repo_id: str | None = None) -> str:
    """The README.md of a model folder: Hub metadata, usage, architecture, settings and results."""
    parts = [
        "---\nlibrary_name: unicom\nlicense: mit\npipeline_tag: image-feature-extraction\n"
        "tags:\n- unicom\n- image-retrieval\n- vision-transformer\n---",
        "# UNICOM image embedding model",
        "A [unicom](https://github.com/deepglint/unicom) VisionTransformer that maps an image to a "
        f"{config.embedding_size}-dimensional embedding (not L2-normalised; normalise it for cosine search).",
        f"```python\nimport unicom\n\nmodel, transform = unicom.load(\"hf-hub:{repo_id or '<org>/<name>'}\")\n"
        "embeddings = unicom.embed(model, [\"photo.jpg\"], transform=transform)   # (1, "
        f"{config.embedding_size}), L2-normalised\n```",
        "## Architecture",
        _table([(k, v) for k, v in config.to_dict().items()], ("field", "value")),
        f"Input: {config.input_size} x {config.input_size} RGB, bicubic resize of the shorter side, center crop, "
        "CLIP mean and std.",
    ]
    if settings:
        parts += ["## Training settings", _table(sorted(settings.items()), ("setting", "value"))]
    if results:
        rows = [(f"Recall@{k} (%)", _number(v)) for k, v in (results.get("recall") or {}).items()]
        rows += [(name, _number(results[key])) for key, name in
                 (("map_at_r", "MAP@R (%)"), ("r_precision", "R-precision (%)"), ("num_query", "queries"),
                  ("num_gallery", "gallery images"), ("epoch", "epoch")) if key in results]
        title = f"## Results on {results['dataset']}" if "dataset" in results else "## Results"
        parts += [title, _table(rows, ("metric", "value"))]
    return "\n\n".join(parts) + "\n"


def push_to_hub(model: torch.nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload unicom model", results: str | os.PathLike | dict | None = None,
                settings: dict | None = None) -> str:
    """Write ``model``'s folder (:func:`save_pretrained`) and upload it to the Hub repository
    ``repo_id`` (``org/name``), created if needed. Returns the commit URL. The endpoint and token
    are huggingface_hub's (``HF_ENDPOINT``, ``HF_TOKEN`` or ``hf auth login``) unless ``token``."""
    from huggingface_hub import HfApi

    parse_hub_name(HUB_PREFIX + repo_id)  # org/name, said before anything is written or sent
    api = HfApi(token=token)  # made here: the endpoint is the environment's now
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unicom-push-") as folder:
        _write_folder(model, Path(folder), results, settings, repo_id)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


# ----------------------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    """``python -m unicom.hf export CHECKPOINT FOLDER [--results results.json]``."""
    parser = argparse.ArgumentParser("python -m unicom.hf", description="Hugging Face Hub model folders")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="turn a checkpoint (model_best.pt, model_last.pt, any file "
                                                "unicom.load reads) into a model folder")
    export.add_argument("checkpoint")
    export.add_argument("folder")
    export.add_argument("--results", default=None,
                        help="a results.json for the model card (default: the one beside the checkpoint, if any)")
    args = parser.parse_args(argv)
    from . import load  # the public entry point (the package resolves it lazily; no cycle with _factory)

    try:
        model, _ = load(args.checkpoint, device="cpu")
        results = args.results
        beside = Path(args.checkpoint).parent / "results.json"
        if results is None and beside.is_file():
            results = beside
        folder = save_pretrained(model, args.folder, results=results)
    except (CheckpointError, DownloadError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {folder / CONFIG_NAME}, {folder / WEIGHTS_NAME} and {folder / CARD_NAME}"
          + (f" (results from {results})" if results is not None else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
