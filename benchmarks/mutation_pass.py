"""Mutation pass: plant one small bug at a time in a copy of the repository and run tests on it.

A mutant is data: ``(id, file, old, new, tests)``. ``old`` must occur exactly once in ``file``;
the mutant replaces it with ``new`` in a temporary copy of the tree (tracked and untracked,
non-ignored files, as ``git ls-files`` lists them; never the real tree), runs
``pytest -x`` on ``tests`` there with ``PYTHONPATH`` pointing at the copy, and counts the
mutant *killed* when a test fails (or the run times out) and *survived* when all pass.
Each test selection first runs once unmutated: a selection that fails on its own makes its
mutants meaningless, and the pass stops.

Usage::

    python benchmarks/mutation_pass.py                          # the built-in mutants, their own tests
    python benchmarks/mutation_pass.py --list                   # list them
    python benchmarks/mutation_pass.py --only drop_path --only std_bgr
    python benchmarks/mutation_pass.py --mutants more.json      # add mutants from a JSON list of objects
    python benchmarks/mutation_pass.py --no-builtin --mutants more.json --tests tests/test_hub.py
    python benchmarks/mutation_pass.py --jobs 2 --json report.json

``--tests`` overrides every mutant's own selection (e.g. the whole suite for the full pass).
A JSON mutant is ``{"id": ..., "file": ..., "old": ..., "new": ..., "tests": [...]}``
(``tests`` optional; the default is ``--tests`` or the whole ``tests`` folder).
Exit status: 0 when every mutant was killed, 1 when some survived, 2 on a usage error or an
invalid mutant, 3 when a selection fails without any mutant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...] = ()
    note: str = ""  # why it is plausible, or why it is judged equivalent when it survives


@dataclass
class Result:
    id: str
    file: str
    status: str  # killed, timeout (killed), survived, invalid, error
    seconds: float
    failed: list[str] = field(default_factory=list)
    detail: str = ""


MODEL = ("tests/test_model.py",)
TRANSFORMS = ("tests/test_transforms.py",)
LOSSES = ("tests/test_losses.py",)
METRICS = ("tests/test_metrics.py",)
DISTRIBUTED = ("tests/test_distributed.py",)

MUTANTS = [
    # --- the named survivors and near-misses -----------------------------------
    Mutant("model.drop_path_no_rescale", "unicom/model.py", "return x * mask / keep", "return x * mask", MODEL,
           "issue 19: DropPath without its 1/keep rescale"),
    Mutant("transforms.std_bgr", "unicom/transforms.py", "STD = (0.26862954, 0.26130258, 0.27577711)",
           "STD = (0.27577711, 0.26130258, 0.26862954)", TRANSFORMS, "issue 19: CLIP std in BGR order"),
    Mutant("transforms.mean_bgr", "unicom/transforms.py", "MEAN = (0.48145466, 0.4578275, 0.40821073)",
           "MEAN = (0.40821073, 0.4578275, 0.48145466)", TRANSFORMS, "issue 19: CLIP mean in BGR order"),
    Mutant("distributed.grad_slice_rank_times_size", "unicom/_distributed.py", "start = sum(ctx.sizes[: ctx.rank])",
           "start = ctx.rank * ctx.sizes[ctx.rank]", DISTRIBUTED, "issue 19: offset of the gradient slice"),
    Mutant("distributed.grad_slice_padded_offset", "unicom/_distributed.py", "start = sum(ctx.sizes[: ctx.rank])",
           "start = ctx.rank * max(ctx.sizes)", DISTRIBUTED, "offset in the padded buffer instead of the result"),
    Mutant("distributed.grad_not_summed", "unicom/_distributed.py",
           "        dist.all_reduce(grad, op=dist.ReduceOp.SUM)\n", "", DISTRIBUTED,
           "each process keeps only its own loss's gradient"),
    Mutant("checkpoint.heads_from_width", "unicom/checkpoint.py", "num_heads=max(dim // 64, 1)",
           "num_heads=max(dim // 64, 2)", MODEL,
           "loads strictly (heads leave no trace in the weights) but computes something else"),
    Mutant("factory.load_without_eval", "unicom/_factory.py", "model = model.eval().to(device=device, dtype=dtype)",
           "model = model.to(device=device, dtype=dtype)", MODEL, "BatchNorm left in training mode"),
    # --- model --------------------------------------------------------------------------
    Mutant("model.drop_path_keep_is_p", "unicom/model.py", ".bernoulli_(keep)", ".bernoulli_(self.p)", MODEL,
           "keeps with probability p instead of 1 - p"),
    Mutant("model.drop_path_per_element", "unicom/model.py", "x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1))",
           "x.new_empty(x.shape)", MODEL, "drops elements instead of whole samples"),
    Mutant("model.drop_path_in_eval", "unicom/model.py", "if self.p == 0.0 or not self.training:",
           "if self.p == 0.0:", MODEL, "stochastic at evaluation"),
    Mutant("model.drop_path_rates", "unicom/model.py", "drop_path_rate * i / max(depth - 1, 1)",
           "drop_path_rate * i / max(depth, 1)", MODEL, "the last block never reaches drop_path_rate"),
    Mutant("model.mlp_second_norm", "unicom/model.py", "self.mlp(self.norm2(x))", "self.mlp(self.norm1(x))", MODEL),
    Mutant("model.drop_path_whole_residual", "unicom/model.py",
           "return x + self.drop_path(self.mlp(self.norm2(x)))", "return self.drop_path(x + self.mlp(self.norm2(x)))",
           MODEL, "drop path around the residual sum"),
    # --- transforms ---------------------------------------------------------------------
    Mutant("transforms.sixteen_bit_scale", "unicom/transforms.py", "else 65535.0", "else 65536.0", TRANSFORMS),
    Mutant("transforms.float_scale", "unicom/transforms.py", 'full_scale = 1.0 if image.mode == "F"',
           'full_scale = 255.0 if image.mode == "F"', TRANSFORMS, "float images read as 0-255"),
    Mutant("transforms.floor_not_round", "unicom/transforms.py", "np.clip(np.rint(array", "np.clip(np.floor(array",
           TRANSFORMS),
    Mutant("transforms.eval_bilinear", "unicom/transforms.py",
           "ToRGB(),\n            T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC)",
           "ToRGB(),\n            T.Resize(n_px, interpolation=T.InterpolationMode.BILINEAR)", TRANSFORMS),
    Mutant("transforms.test_resize_rounded", "unicom/transforms.py", "resize = int(n_px / 0.875)",
           "resize = round(n_px / 0.875)", TRANSFORMS),
    Mutant("transforms.timm_default_normalisation", "unicom/transforms.py", "re_count=1, mean=MEAN, std=STD)",
           "re_count=1)", TRANSFORMS, "timm's ImageNet mean and std instead of CLIP's"),
    Mutant("transforms.one_bit_as_grey", "unicom/transforms.py", 'image.mode in ("I", "F")',
           'image.mode in ("I", "F", "1")', TRANSFORMS, "bilevel images scaled like 16-bit ones"),
    # --- losses -------------------------------------------------------------------------
    Mutant("losses.straight_through_no_clamp", "unicom/losses.py", "theta = torch.acos(cos.clamp(-1.0, 1.0))",
           "theta = torch.acos(cos)", LOSSES, "NaN when a cosine rounds to 1 + 1 ulp"),
    Mutant("losses.exact_no_eps", "unicom/losses.py", "cos.clamp(-1.0 + eps, 1.0 - eps)", "cos.clamp(-1.0, 1.0)",
           LOSSES, "infinite gradient at cos = +-1"),
    Mutant("losses.fallback_offset", "unicom/losses.py", "fallback = cos - (math.cos(self.theta_max) + 1.0)",
           "fallback = cos - math.cos(self.theta_max)", LOSSES),
    Mutant("losses.m3_sign", "unicom/losses.py", "shift = torch.cos(self.m1 * theta + self.m2) - self.m3 - cos",
           "shift = torch.cos(self.m1 * theta + self.m2) + self.m3 - cos", LOSSES),
    Mutant("losses.grad_not_averaged", "unicom/losses.py", "grad.mul_(grad_loss / prob.shape[0])",
           "grad.mul_(grad_loss)", LOSSES),
    Mutant("losses.exact_gradient_straight", "unicom/losses.py", 'if self.gradient == "straight-through":',
           'if self.gradient in MARGIN_GRADIENTS:', LOSSES, "exact mode silently straight-through"),
    # --- metrics ------------------------------------------------------------------------
    Mutant("metrics.no_self_exclusion_in_r", "unicom/metrics.py",
           "num_relevant = gallery_counts[query_ids] - int(exclude_self)",
           "num_relevant = gallery_counts[query_ids]", METRICS, "R counts the query itself"),
    Mutant("metrics.r_precision_off_by_one", "unicom/metrics.py", "cum_hits.gather(1, (r - 1).clamp(min=0)",
           "cum_hits.gather(1, (r - 2).clamp(min=0)", METRICS),
    Mutant("metrics.knn_weight_times_t", "unicom/metrics.py", "values) / temperature)", "values) * temperature)",
           METRICS, "vote weight exp(sim * T)"),
    Mutant("metrics.top5_counts_unvoted", "unicom/metrics.py", "hit = (top == target) & (scores.gather(1, top) > 0)",
           "hit = top == target", METRICS),
    Mutant("metrics.ties_by_higher_index", "unicom/metrics.py", "return (runs * num_gallery + indices).argsort(dim=1)",
           "return (runs * num_gallery - indices).argsort(dim=1)", METRICS),
    Mutant("metrics.merge_unstable", "unicom/metrics.py", "order = indices.argsort(dim=1, stable=True)",
           "order = indices.argsort(dim=1, descending=True, stable=True)", METRICS, "merged ties by higher index"),
]


def _repo_files(root: Path) -> list[str]:
    """Tracked and untracked, non-ignored files: the tree a clone plus work in progress would have."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, dest: Path) -> None:
    for name in _repo_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def load_mutants(path: Path) -> list[Mutant]:
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of mutant objects")
    return [Mutant(**{**e, "tests": tuple(e.get("tests", ()))}) for e in entries]


def check_mutant(mutant: Mutant, root: Path) -> str:
    """'' when the mutant applies, else why not."""
    path = root / mutant.file
    if not path.is_file():
        return f"no file {mutant.file}"
    count = path.read_text().count(mutant.old)
    return "" if count == 1 else f"'old' occurs {count} times in {mutant.file} (expected once)"


def run_pytest(copy: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[str, float, list[str], str]:
    """(status, seconds, failed test ids, output tail) of ``pytest -x`` on ``tests`` in ``copy``."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode between mutants
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    start = time.monotonic()
    # Its own session, so a timeout ends pytest and the processes it started (gloo workers), no others.
    process = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        # 1: a test failed; 2: interrupted, e.g. the mutant breaks an import during collection.
        status = {0: "survived", 1: "killed", 2: "killed"}.get(process.returncode, "error")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = "timeout"
    text = output.decode(errors="replace")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    return status, time.monotonic() - start, failed, text[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=Path, action="append", default=[], help="JSON file of extra mutants")
    parser.add_argument("--no-builtin", action="store_true", help="only the mutants from --mutants")
    parser.add_argument("--only", action="append", default=[], help="run mutants whose id contains this (repeatable)")
    parser.add_argument("--tests", nargs="+", help="pytest selection for every mutant (overrides their own)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (then: killed)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository to copy (default: this one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    mutants = [] if args.no_builtin else list(MUTANTS)
    try:
        for path in args.mutants:
            mutants += load_mutants(path)
    except (OSError, ValueError, TypeError) as e:
        parser.error(f"cannot read mutants: {e}")
    if args.only:
        mutants = [m for m in mutants if any(part in m.id for part in args.only)]
    if len({m.id for m in mutants}) != len(mutants):
        parser.error("mutant ids must be unique")
    if not mutants:
        parser.error("no mutants selected")
    selection = {m.id: tuple(args.tests) if args.tests else (m.tests or ("tests",)) for m in mutants}
    if args.list:
        for m in mutants:
            print(f"{m.id:45s} {m.file:24s} {' '.join(selection[m.id])}")
        return 0

    root = args.root.resolve()
    invalid = {m.id: why for m in mutants if (why := check_mutant(m, root))}
    for mutant_id, why in invalid.items():
        print(f"invalid mutant {mutant_id}: {why}", file=sys.stderr)
    if invalid:
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="unicom-mutants-"))
    if workdir.resolve().is_relative_to(root):
        raise RuntimeError(f"refusing to work inside the repository: {workdir}")
    try:
        copies: Queue[Path] = Queue()
        for i in range(min(args.jobs, len(mutants))):
            copy = workdir / f"copy{i}"
            copy_tree(root, copy)
            copies.put(copy)

        # Every selection must pass unmutated first.
        baseline_copy = copies.get()
        for tests in dict.fromkeys(selection.values()):
            status, seconds, failed, tail = run_pytest(baseline_copy, tests, args.timeout)
            print(f"baseline {' '.join(tests)}: {status} in {seconds:.1f} s", flush=True)
            if status != "survived":
                print(tail, file=sys.stderr)
                return 3
        copies.put(baseline_copy)

        lock = threading.Lock()

        def run_one(mutant: Mutant) -> Result:
            copy = copies.get()
            path = copy / mutant.file
            original = path.read_text()
            try:
                path.write_text(original.replace(mutant.old, mutant.new, 1))
                status, seconds, failed, tail = run_pytest(copy, selection[mutant.id], args.timeout)
            finally:
                path.write_text(original)
                copies.put(copy)
            result = Result(mutant.id, mutant.file, status, seconds, failed,
                            tail if status in ("survived", "error") else "")
            with lock:
                print(f"{status:9s} {seconds:6.1f} s  {mutant.id}  {' '.join(failed[:1])}", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(run_one, mutants))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    killed = sum(r.status in ("killed", "timeout") for r in results)
    survived = [r for r in results if r.status == "survived"]
    errors = [r for r in results if r.status == "error"]
    print(f"\n{killed} of {len(results)} mutants killed ({100 * killed / len(results):.0f}%), "
          f"{len(survived)} survived, {len(errors)} errors")
    for r in survived + errors:
        print(f"  {r.status}: {r.id} ({r.file})")
    if args.json:
        args.json.write_text(json.dumps({"mutants": [asdict(m) for m in mutants],
                                         "results": [asdict(r) for r in results]}, indent=1))
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
