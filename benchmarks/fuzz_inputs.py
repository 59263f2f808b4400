"""Fuzz unicom's inputs and count what each bad input ends in, per class of input.

Classes: checkpoints (zip ``.pt``, legacy ``.pt``, ``.safetensors``: bit flips, truncation,
bytes in front, zeroed blocks, odd configs), images (JPEG scans with flipped or overwritten
bytes, truncation), dataset folders (symlink cycles, links to files, FIFOs, sockets and
folders named like images), downloads (a local server that trickles, lies about sizes,
serves a page; bad targets, URLs and timeouts) and program flags (devices, outputs,
numbers out of range).

Outcomes:

* ``clear``: the library's own error (CheckpointError, BadImageError, DownloadError, a usage
  error with exit status 2) in one line that names the file or flag;
* ``flagged``: the input was used but reported (a damaged JPEG counted and named, a
  checkpoint that cannot be checked loaded with a warning);
* ``ok``: the mutation changed nothing that matters (identical weights or pixels);
* ``unclear``: the right kind of error, but a message that misleads or names nothing;
* ``traceback``: any other exception;
* ``silent``: a different result with no word;
* ``hang``: no answer within the case's time limit.

    python -m benchmarks.fuzz_inputs                 # all classes, about five minutes on 2 cores
    python -m benchmarks.fuzz_inputs --only flags --json fuzz.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

OUTCOMES = ("clear", "flagged", "ok", "unclear", "traceback", "silent", "hang")


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    def fire(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Warnings(logging.Handler):
    """Collects warnings from logging and the warnings module during a case."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _collect_warnings():
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield handler.messages
        finally:
            logging.getLogger().removeHandler(handler)
            handler.messages.extend(str(w.message) for w in caught)


def _one_line_naming(message: str, name: str) -> bool:
    return "\n" not in message.strip() and (not name or name in message)


# ----------------------------------------------------------------------------- checkpoints


def _tiny_model():
    import unicom

    torch.manual_seed(0)
    return unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2, num_heads=2)


def _same_weights(loaded, reference) -> bool:
    a, b = loaded.state_dict(), reference.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def _load_outcome(path: Path, reference, unsafe: bool = False) -> tuple[str, str]:
    import unicom
    from unicom.checkpoint import CheckpointError

    try:
        with _deadline(30), _collect_warnings() as said:
            model, _ = unicom.load(str(path), device="cpu")
    except _Timeout:
        return "hang", ""
    except CheckpointError as e:
        message = str(e)
        misleading = ("arbitrary code" in message or "unsafe" in message.lower()) != unsafe
        return ("unclear" if misleading or not _one_line_naming(message, str(path)) else "clear"), message
    except Exception as e:  # noqa: BLE001 - counting every kind of failure is the point
        return "traceback", f"{type(e).__name__}: {e}"
    if unsafe:
        return "silent", "loaded a file that needs pickled code"
    if _same_weights(model, reference) and model.config == reference.config:
        return "ok", ""
    checked = [m for m in said if "check" in m.lower() or "integrity" in m.lower()]
    return ("flagged", checked[0]) if checked else ("silent", "other weights, no word")


def _mutations(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(count):
        kind = rng.choice(("flip", "flip", "flip", "head", "head", "truncate", "prepend", "zero", "append"))
        if kind in ("flip", "head"):  # head: within the first 4 KiB (headers, pickles, zip entries)
            i = rng.randrange(len(data) if kind == "flip" else min(len(data), 4096))
            out.append((f"flip@{i}", data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]))
        elif kind == "truncate":
            n = rng.randrange(len(data))
            out.append((f"truncate@{n}", data[:n]))
        elif kind == "prepend":
            n = rng.choice((1, 2, 7, 512))
            out.append((f"prepend{n}", bytes(rng.randrange(256) for _ in range(n)) + data))
        elif kind == "append":
            out.append(("append", data + b"\x00garbage"))
        else:
            i = rng.randrange(len(data))
            out.append((f"zero@{i}", data[:i] + bytes(min(64, len(data) - i)) + data[i + 64:]))
    return out


def fuzz_checkpoints(work: Path, rng: random.Random, n: int) -> list[dict]:
    from unicom.checkpoint import save_model

    reference = _tiny_model().eval()
    bases = {}
    save_model(reference, work / "base.pt")
    bases["zip"] = (work / "base.pt").read_bytes()
    save_model(reference, work / "base.safetensors")
    bases["safetensors"] = (work / "base.safetensors").read_bytes()
    legacy = io.BytesIO()
    torch.save({"config": reference.config.to_dict(), "state_dict": reference.state_dict()}, legacy,
               _use_new_zipfile_serialization=False)
    bases["legacy"] = legacy.getvalue()
    cases = []
    for kind, data in bases.items():
        suffix = ".safetensors" if kind == "safetensors" else ".pt"
        for name, mutated in _mutations(data, rng, n):
            path = work / f"m{suffix}"
            path.write_bytes(mutated)
            outcome, detail = _load_outcome(path, reference)
            cases.append(dict(cls=f"checkpoint/{kind}", case=name, outcome=outcome, detail=detail[:300]))
    # hand-made ones: a lone pickle opcode, an empty file, odd recorded configs, real pickled code
    state = {k: v for k, v in reference.state_dict().items()}
    specials = {
        "x80": b"\x80", "empty": b"", "html": b"<html>404</html>",
        "num_heads0": {"config": {**reference.config.to_dict(), "num_heads": 0}, "state_dict": state},
        "num_heads3": {"config": {**reference.config.to_dict(), "num_heads": 3}, "state_dict": state},
        "depth-1": {"config": {**reference.config.to_dict(), "depth": -1}, "state_dict": state},
        "dim0": {"config": {**reference.config.to_dict(), "dim": 0}, "state_dict": state},
    }
    for name, content in specials.items():
        path = work / "s.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        outcome, detail = _load_outcome(path, reference)
        cases.append(dict(cls="checkpoint/special", case=name, outcome=outcome, detail=detail[:300]))
    path = work / "code.pt"
    torch.save({"state_dict": state, "extra": _Code()}, path)
    outcome, detail = _load_outcome(path, reference, unsafe=True)
    cases.append(dict(cls="checkpoint/special", case="pickled-code", outcome=outcome, detail=detail[:300]))
    return cases


class _Code:
    def __reduce__(self):
        return (print, ("pickled code ran",))


# ----------------------------------------------------------------------------- images


def _jpegs(rng: np.random.Generator) -> list[bytes]:
    y, x = np.mgrid[0:96, 0:128]
    smooth = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.float64)
    pixels = np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)
    out = []
    for options in (dict(quality=90), dict(quality=75, subsampling=0), dict(quality=85, progressive=True)):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", **options)
        out.append(buffer.getvalue())
    return out


def _image_check(path: Path, strict: bool):
    """Decode one file as the evaluation does: (pixels or None, flagged reason or None, error)."""
    from unicom.data import image

    dataset = image.ImageDataset([str(path)], [0])
    check = getattr(image, "check_jpegs", None)  # absent before the checks existed
    flagged = next(iter(check(dataset, strict=strict).values()), None) if check is not None else None
    return np.asarray(dataset.load_image(0)), flagged


def fuzz_images(work: Path, rng: random.Random, n: int) -> list[dict]:
    from unicom.data.image import BadImageError

    cases = []
    for b, data in enumerate(_jpegs(np.random.default_rng(0))):
        clean = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        scan_start = data.index(b"\xff\xda") + 20
        for _ in range(n):
            kind = rng.choice(("flip", "flip", "overwrite", "truncate", "insert", "header"))
            i = rng.randrange(scan_start, len(data) - 2)
            if kind == "header":  # a flipped bit before the scan: frame size, tables, markers
                i = rng.randrange(2, scan_start - 20)
                mutated = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
            if kind == "header":
                pass
            elif kind == "flip":
                mutated = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
            elif kind == "overwrite":
                mutated = data[:i] + bytes(rng.randrange(256) for _ in range(8)) + data[i + 8:]
            elif kind == "insert":
                mutated = data[:i] + bytes(rng.randrange(256) for _ in range(5)) + data[i:]
            else:
                mutated = data[:i]
            path = work / "m.jpg"
            path.write_bytes(mutated)
            for strict in (False, True):
                try:
                    with _deadline(20):
                        pixels, flagged = _image_check(path, strict)
                except _Timeout:
                    outcome, detail = "hang", ""
                except BadImageError as e:
                    outcome, detail = ("clear" if _one_line_naming(str(e), str(path)) else "unclear"), str(e)
                except Exception as e:  # noqa: BLE001
                    outcome, detail = "traceback", f"{type(e).__name__}: {e}"
                else:
                    same = pixels.shape == clean.shape and np.array_equal(pixels, clean)
                    outcome = "flagged" if flagged else ("ok" if same else "silent")
                    diff = (np.abs(pixels.astype(int) - clean.astype(int)).max()
                            if pixels.shape == clean.shape else "-")
                    detail = flagged or ("" if same else f"shape {pixels.shape}, max diff {diff}")
                cases.append(dict(cls=f"image/{'strict' if strict else 'default'}", case=f"jpeg{b}:{kind}@{i}",
                                  outcome=outcome, detail=detail[:300]))
    return cases


# ----------------------------------------------------------------------------- folders


def _write_tree(root: Path, classes: int = 3, per_class: int = 4) -> None:
    for c in range(classes):
        folder = root / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (40 * c, 10 * i, 0)).save(folder / f"{i}.jpg")


def fuzz_folders(work: Path) -> list[dict]:
    from unicom.data import load_image_folder

    def cycle(root):
        os.symlink(".", root / "c2" / "loop")

    def cycle_up(root):
        os.symlink("..", root / "c1" / "up")

    def file_link(root):
        os.symlink(root / "c0" / "0.jpg", root / "c0" / "alias.jpg")

    def fifo(root):
        os.mkfifo(root / "c1" / "x.jpg")

    def fifo_skip(root):
        os.mkfifo(root / "c1" / "x.jpg")

    def sock(root):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(root / "c0" / "s.jpg"))
        s.close()

    def folder_named_jpg(root):
        (root / "c0" / "d.jpg").mkdir()

    def class_link(root):
        os.symlink(root / "c0", root / "c3")  # a class folder that is a link to another class

    def dangling(root):
        os.symlink(root / "nowhere.jpg", root / "c0" / "gone.jpg")

    def deep_cycle(root):
        (root / "c0" / "a" / "b").mkdir(parents=True)
        os.symlink(root / "c0", root / "c0" / "a" / "b" / "back")

    # (mutation, expected images once each real file is visited once and only regular files count, skip)
    cases_spec = [
        ("symlink-cycle", cycle, 12, False), ("symlink-to-parent", cycle_up, 12, False),
        ("symlink-to-file", file_link, 12, False), ("fifo", fifo, 12, False), ("fifo+skip", fifo_skip, 12, True),
        ("socket", sock, 12, False), ("folder-named-jpg", folder_named_jpg, 12, False),
        ("class-symlink", class_link, 12, False), ("dangling-link", dangling, 12, True),
        ("deep-cycle", deep_cycle, 12, False),
    ]
    cases = []
    for name, mutate, expected, skip in cases_spec:
        root = work / f"tree-{name}"
        _write_tree(root)
        mutate(root)
        try:
            with _deadline(20):
                dataset = load_image_folder(root, skip_bad_images=skip)
                ok = sum(bool(dataset[i][3]) for i in range(len(dataset)))
        except _Timeout:
            outcome, detail = "hang", ""
        except Exception as e:  # noqa: BLE001
            from unicom.data import BadImageError

            clear = isinstance(e, (BadImageError, FileNotFoundError, ValueError)) and "\n" not in str(e)
            outcome, detail = ("clear" if clear else "traceback"), f"{type(e).__name__}: {e}"
        else:
            outcome = "ok" if ok == expected else "silent"
            detail = f"{len(dataset)} files, {ok} images decoded, expected {expected}"
        cases.append(dict(cls="folder", case=name, outcome=outcome, detail=detail[:300]))
    return cases


# ----------------------------------------------------------------------------- downloads


def fuzz_downloads(work: Path) -> list[dict]:
    from http_server import FileServer, free_port

    from unicom import _hub as hub
    from unicom._hub import DownloadError

    hub._RETRY_BACKOFF_S = 0.05
    data = random.Random(1).randbytes(300_000)
    sha = hashlib.sha256(data).hexdigest()
    cases = []
    with FileServer() as server:
        specs = []
        for behaviour, kwargs in (("trickle", dict(delay=0.05)), ("truncate", {}), ("wrong", dict(wrong=b"<html>x")),
                                  ("404", {}), ("500", {}), ("slow", dict(delay=5)), ("long", {}), ("short", {})):
            if behaviour in ("long", "short"):
                body = data + b"extra" if behaviour == "long" else data[:-5]
                url = server.add(f"/{behaviour}.bin", body)
            else:
                try:
                    url = server.add(f"/{behaviour}.bin", data, behaviour, **kwargs)
                except ValueError:  # the server lacks this behaviour
                    continue
            specs.append((behaviour, url, dict(sha256=sha, root=work / behaviour, timeout=1.0, retries=2)))
        good = server.add("/good.bin", data)
        (work / "isdir" / "good.bin").mkdir(parents=True)
        specs += [
            ("target-is-dir", good, dict(sha256=sha, root=work / "isdir", timeout=2.0)),
            ("no-scheme", "127.0.0.1/good.bin", dict(sha256=sha, root=work / "ns", timeout=2.0, retries=3)),
            ("bad-scheme", "ftp:/good.bin", dict(sha256=sha, root=work / "bs", timeout=2.0, retries=3)),
            ("timeout-0", good, dict(sha256=sha, root=work / "t0", timeout=0.0, retries=3)),
            ("timeout-negative", good, dict(sha256=sha, root=work / "tn", timeout=-1.0, retries=3)),
            ("timeout-nan", good, dict(sha256=sha, root=work / "tnan", timeout=float("nan"), retries=3)),
            ("retries-negative", good, dict(sha256=sha, root=work / "rn", retries=-1)),
            ("refused", f"http://127.0.0.1:{free_port()}/x.bin", dict(sha256=sha, root=work / "rf", timeout=1.0,
                                                                       retries=1)),
            ("root-is-file", good, dict(sha256=sha, root=work / "afile")),
        ]
        (work / "afile").write_bytes(b"x")
        for name, url, kwargs in specs:
            start = time.perf_counter()
            try:
                with _deadline(40), _collect_warnings() as said:
                    path = hub.download(url, progress=False, **kwargs)
            except _Timeout:
                outcome, detail = "hang", ""
            except (DownloadError, ValueError) as e:
                attempts = len([m for m in said if "retry" in m])
                transient = name in ("trickle", "truncate", "500", "slow", "refused", "short")
                message = str(e)
                clear = "\n" not in message and (attempts == 0 or transient)
                outcome, detail = ("clear" if clear else "unclear"), f"{attempts} retries: {message}"
            except Exception as e:  # noqa: BLE001
                outcome, detail = "traceback", f"{type(e).__name__}: {e}"
            else:
                right = Path(path).read_bytes() == data
                outcome, detail = ("ok" if right else "silent"), path
            detail = f"{time.perf_counter() - start:.1f} s: {detail}"
            cases.append(dict(cls="download", case=name, outcome=outcome, detail=detail[:300]))
    return cases


# ----------------------------------------------------------------------------- flags


def _knn_tree(root: Path) -> None:
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (100 * c, 20 * i, 50)).save(folder / f"{i}.png")


def _run_program(main, argv: list[str], timeout: float) -> tuple[str, int | None, str]:
    """(ended: 'exit'|'exception'|'hang', exit status, stderr or exception text)."""
    from unicom.programs.common import run_cli

    err = io.StringIO()
    try:
        with _deadline(timeout), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = run_cli(lambda: main(argv))
    except _Timeout:
        return "hang", None, ""
    except SystemExit as e:
        return "exit", int(e.code or 0), err.getvalue()
    except Exception as e:  # noqa: BLE001
        return "exception", None, f"{type(e).__name__}: {e}"
    return "exit", status, err.getvalue()


def fuzz_flags(work: Path) -> list[dict]:
    from unicom.checkpoint import save_model
    from unicom.programs import knn, retrieval

    model = work / "tiny.pt"
    save_model(_tiny_model(), model)
    _knn_tree(work / "knn")
    (work / "a_file").write_text("x")
    out = str(work / "out")
    under_file = str(work / "a_file" / "sub")
    ret = ["--eval", "--dataset", "digits", "--model_name", str(model), "--num_workers", "0", "--device", "cpu",
           "--output", out]
    fine = ["--dataset", "digits", "--model_name", str(model), "--num_workers", "0", "--device", "cpu",
            "--output", out, "--batch_size", "64"]
    kn = ["--train-dataset", str(work / "knn" / "train"), "--val-dataset", str(work / "knn" / "val"),
          "--model-name", str(model), "--num-workers", "0", "--device", "cpu", "--nb_knn", "2",
          "--output-dir", out]
    # (name, program, argv, the flag the message must name)
    specs = [(f"retrieval --device {d!r}", retrieval.main, ret + ["--device", d], "--device")
             for d in ("cuda", "cuda:7", "", "tpu", "mps", "meta", "cuda:-1", "cpu:x", "xla")]
    specs += [
        ("retrieval --output under a file", retrieval.main, ret + ["--output", under_file], "--output"),
        ("retrieval --output ''", retrieval.main, ret + ["--output", ""], "--output"),
        ("retrieval --seed 2**70", retrieval.main, ret + ["--seed", "1180591620717411303424"], "--seed"),
        ("retrieval --seed -1", retrieval.main, ret + ["--seed", "-1"], "--seed"),
        ("retrieval --model_name ''", retrieval.main, ret + ["--model_name", ""], "--model_name"),
        ("retrieval --batch_size 0", retrieval.main, ret + ["--batch_size", "0"], "--batch_size"),
        ("retrieval --num_workers -1", retrieval.main, ret + ["--num_workers", "-1"], "--num_workers"),
        ("retrieval --chunk-size 0", retrieval.main, ret + ["--chunk-size", "0"], "--chunk-size"),
        ("retrieval --num_feat 0", retrieval.main, ret + ["--num_feat", "0"], "--num_feat"),
        ("finetune --epochs -1", retrieval.main, fine + ["--epochs", "-1"], "--epochs"),
        ("finetune --lr nan", retrieval.main, fine + ["--epochs", "1", "--lr", "nan"], "--lr"),
        ("finetune --gradient_acc 0", retrieval.main, fine + ["--epochs", "1", "--gradient_acc", "0"],
         "--gradient_acc"),
        ("finetune --sample_rate 0", retrieval.main, fine + ["--epochs", "1", "--sample_rate", "0"], "--sample_rate"),
        ("finetune --sample_rate 1.5", retrieval.main, fine + ["--epochs", "1", "--sample_rate", "1.5"],
         "--sample_rate"),
        ("finetune --output under a file", retrieval.main, fine + ["--epochs", "1", "--output", under_file],
         "--output"),
    ]
    specs += [(f"knn --temperature {t}", knn.main, kn + ["--temperature", t], "--temperature")
              for t in ("1e-300", "1e-46", "inf", "nan", "0", "-1")]
    specs += [
        ("knn --n-per-class-list -5", knn.main, kn + ["--n-per-class-list", "-5"], "--n-per-class-list"),
        ("knn --n-per-class-list 0", knn.main, kn + ["--n-per-class-list", "0"], "--n-per-class-list"),
        ("knn --output-dir ''", knn.main, kn + ["--output-dir", ""], "--output-dir"),
        ("knn --output-dir under a file", knn.main, kn + ["--output-dir", under_file], "--output-dir"),
        ("knn --batch-size 0", knn.main, kn + ["--batch-size", "0"], "--batch-size"),
        ("knn --device cuda", knn.main, kn + ["--device", "cuda"], "--device"),
        ("knn --seed 2**64", knn.main, kn + ["--seed", str(2**64)], "--seed"),
        ("knn --model-name ''", knn.main, kn + ["--model-name", ""], "--model"),
    ]
    cases = []
    cwd = os.getcwd()
    for name, main, argv, flag in specs:
        scratch = Path(tempfile.mkdtemp(dir=work))
        os.chdir(scratch)  # so that a stray write into the current folder shows
        try:
            ended, status, text = _run_program(main, argv, timeout=120)
            stray = [p.name for p in scratch.iterdir()]
        finally:
            os.chdir(cwd)
        last = [line for line in text.strip().splitlines() if line.strip()]
        if ended == "hang":
            outcome = "hang"
        elif ended == "exception":
            outcome = "traceback"
        elif status == 0:
            outcome = "silent"
        elif status == 2 and last and flag.lstrip("-").replace("-", "_") in last[-1].replace("-", "_"):
            outcome = "clear"
        else:
            outcome = "unclear"
        detail = (last[-1] if last else text) + (f" (wrote {stray} into the current folder)" if stray else "")
        cases.append(dict(cls="flag", case=name, outcome=outcome, detail=detail[:300]))
    return cases


# ----------------------------------------------------------------------------- main


def summarize(cases: list[dict]) -> str:
    table: dict[str, Counter] = defaultdict(Counter)
    for case in cases:
        table[case["cls"]][case["outcome"]] += 1
    lines = [f"{'class':<22}{'cases':>6}" + "".join(f"{o:>10}" for o in OUTCOMES)]
    for cls in sorted(table):
        counts = table[cls]
        lines.append(f"{cls:<22}{sum(counts.values()):>6}" + "".join(f"{counts[o]:>10}" for o in OUTCOMES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("checkpoints", "images", "folders", "downloads", "flags"),
                        default=("checkpoints", "images", "folders", "downloads", "flags"))
    parser.add_argument("--checkpoint-cases", type=int, default=150, help="mutations per checkpoint format")
    parser.add_argument("--image-cases", type=int, default=40, help="mutations per base JPEG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every case with its outcome here")
    parser.add_argument("--show", nargs="*", default=("traceback", "silent", "hang", "unclear"),
                        help="print the cases with these outcomes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger().addHandler(logging.NullHandler())  # warnings are collected per case, not printed
    logging.getLogger().setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    cases: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {"checkpoints": lambda w: fuzz_checkpoints(w, rng, args.checkpoint_cases),
                "images": lambda w: fuzz_images(w, rng, args.image_cases),
                "folders": fuzz_folders, "downloads": fuzz_downloads, "flags": fuzz_flags}
        for name in args.only:
            (work / name).mkdir()
            start = time.perf_counter()
            cases += runs[name](work / name)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for case in cases:
        if case["outcome"] in args.show:
            print(f"[{case['outcome']}] {case['cls']} {case['case']}: {case['detail'][:200]}")
    print(summarize(cases))
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
