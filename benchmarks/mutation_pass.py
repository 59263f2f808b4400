"""Mutation pass: plant one small bug at a time in a copy of the repository and run tests on it.

A mutant is data: one ``[[mutant]]`` table in ``benchmarks/mutants/<module>.toml`` (one file per
module, so mutants for a new module are a new file, and more for an old one are appended
entries)::

    [[mutant]]
    id = 'hub.416_skips_hash'              # unique; --only matches parts of it
    file = 'unicom/_hub.py'
    old = 'return _hash_file(part).hexdigest()'   # must occur exactly once in file
    new = 'return expected'
    tests = ['tests/test_hub.py']          # pytest arguments: files or node ids that should catch it
    note = 'why it is a plausible bug'
    equivalent = ''                        # if set: why it cannot change behaviour (not scored)

The pass replaces ``old`` with ``new`` in a temporary copy of the tree (tracked and untracked,
non-ignored files, as ``git ls-files`` lists them; never the real tree), runs ``pytest -x`` on
``tests`` there with ``PYTHONPATH`` pointing at the copy, and counts the mutant *killed* when a
test fails (or the run times out) and *survived* when all pass. Each test selection first runs
once unmutated: a selection that fails on its own makes its mutants meaningless, and the pass
stops. A mutant judged equivalent (``equivalent`` set) is run and reported but left out of the
score.

Usage::

    nice python benchmarks/mutation_pass.py > mutation.log 2>&1 &   # every mutant, its own tests
    python benchmarks/mutation_pass.py --list                   # list them
    python benchmarks/mutation_pass.py --only hub. --only drop_path
    python benchmarks/mutation_pass.py --mutants more.toml      # add mutants (.toml or a .json list)
    python benchmarks/mutation_pass.py --no-builtin --mutants more.json --tests tests/test_hub.py
    python benchmarks/mutation_pass.py --jobs 2 --json report.json
    python benchmarks/mutation_pass.py --root /tmp/old-checkout  # score another tree (a git checkout)

``--tests`` overrides every mutant's own selection (e.g. the whole suite for the full pass).
Exit status: 0 when every scored mutant was killed, 1 when some survived, 2 on a usage error or
an invalid mutant, 3 when a selection fails without any mutant.
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
import tomllib
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
    note: str = ""  # why it is a plausible bug
    equivalent: str = ""  # why it cannot change behaviour: run and reported, not scored


@dataclass
class Result:
    id: str
    file: str
    status: str  # killed, timeout (killed), survived, invalid, error
    seconds: float
    failed: list[str] = field(default_factory=list)
    detail: str = ""


MUTANTS_DIR = Path(__file__).resolve().parent / "mutants"


def load_mutants(path: Path) -> list[Mutant]:
    """The mutants of a ``.toml`` file (``[[mutant]]`` tables) or a ``.json`` list of objects."""
    if path.suffix == ".toml":
        entries = tomllib.loads(path.read_text()).get("mutant", [])
    else:
        entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{path}: expected a list of mutant tables")
    return [Mutant(**{**e, "tests": tuple(e.get("tests", ()))}) for e in entries]


def builtin_mutants(folder: Path = MUTANTS_DIR) -> list[Mutant]:
    """Every ``benchmarks/mutants/*.toml`` file, in file name order: one file per module."""
    return [m for path in sorted(folder.glob("*.toml")) for m in load_mutants(path)]


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
    parser.add_argument("--mutants", type=Path, action="append", default=[],
                        help="extra mutants: a .toml or .json file (repeatable)")
    parser.add_argument("--no-builtin", action="store_true", help="only the mutants from --mutants")
    parser.add_argument("--only", action="append", default=[], help="run mutants whose id contains this (repeatable)")
    parser.add_argument("--tests", nargs="+", help="pytest selection for every mutant (overrides their own)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (then: killed)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository to copy (default: this one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    mutants = [] if args.no_builtin else builtin_mutants()
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

    report(mutants, results)
    if args.json:
        args.json.write_text(json.dumps({"mutants": [asdict(m) for m in mutants],
                                         "results": [asdict(r) for r in results]}, indent=1))
    equivalent = {m.id for m in mutants if m.equivalent}
    return 0 if all(r.status in ("killed", "timeout") or r.id in equivalent for r in results) else 1


def report(mutants: list[Mutant], results: list[Result]) -> None:
    """The score (equivalent mutants left out), a line per module, and every survivor."""
    by_id = {m.id: m for m in mutants}
    scored = [r for r in results if not by_id[r.id].equivalent]
    killed = [r for r in scored if r.status in ("killed", "timeout")]
    print(f"\n{len(killed)} of {len(scored)} scored mutants killed ({100 * len(killed) / max(len(scored), 1):.0f}%), "
          f"{len(results) - len(scored)} judged equivalent")
    for file in sorted({r.file for r in results}):
        mine = [r for r in scored if r.file == file]
        print(f"  {file:40s} {sum(r in killed for r in mine):3d} / {len(mine)}")
    for r in results:
        if r.status not in ("killed", "timeout"):
            why = by_id[r.id].equivalent
            print(f"  {r.status}: {r.id} ({r.file})" + (f" - equivalent: {why}" if why else ""))


if __name__ == "__main__":
    sys.exit(main())
