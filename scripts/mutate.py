#!/usr/bin/env python3
"""Mutation testing of listed, targeted mutants (``make mutate``); not part of ``make test``.

Each mutant of scripts/mutants.py replaces one exact snippet of one file (the
snippet must occur exactly once, so a stale list fails loudly) and names the
tests that should catch it. The runner copies the working tree (git's tracked
and untracked, non-ignored files) into a temporary folder per job, so the
shared checkout is never modified, checks that the copy imports its own
``camtl.kernels``, runs each distinct test set once unmutated (the baseline
must pass), then applies one mutant at a time and runs its tests there:

    caught    the tests failed
    error     pytest could not run them (collection/import error); caught, shown apart
    timeout   the tests ran past the limit
    survived  the tests passed: a missing test
    baseline  the unmutated tests did not pass: no verdict

Prints a table and a summary, writes JSON, exits 1 if a mutant survived or a
baseline failed.

    python scripts/mutate.py [--only A3,L7] [--list] [--jobs N] [--timeout S] [--out PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# pytest exit codes: 0 passed, 1 tests failed, 2 interrupted (e.g. a collection error), 3 internal error,
# 4 usage error, 5 no test collected.
_PYTEST_FAILED = 1
ORDER = ("caught", "error", "timeout", "survived", "baseline")


class ListError(ValueError):
    """The mutant list does not match the tree (a snippet missing or ambiguous, a duplicate id...)."""


def load_mutants(path: Path) -> list:
    spec = importlib.util.spec_from_file_location("camtl_mutants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MUTANTS)


def check_mutants(mutants: Sequence, tree: Path) -> None:
    """Raises ListError naming every mutant whose snippet does not occur exactly once in its file."""
    problems, seen = [], set()
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if m.original == m.replacement:
            problems.append(f"{m.id}: the replacement equals the original")
        if not shlex.split(m.tests):
            problems.append(f"{m.id}: no tests to run")
        path = tree / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times (ambiguous)"
            problems.append(f"{m.id}: snippet {m.original!r} {where} in {m.file}")
    if problems:
        raise ListError("the mutant list is stale; update scripts/mutants.py:\n  " + "\n  ".join(problems))


def working_tree_files(root: Path) -> List[str]:
    """The working tree's tracked and untracked, non-ignored files (as git lists them), relative to root."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def copy_tree(root: Path, dest: Path) -> None:
    """Copies the working tree's files into dest (a file deleted in the working tree is skipped)."""
    for name in working_tree_files(root):
        src = root / name
        if not os.path.lexists(src) or src.is_dir():  # deleted, or a submodule
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def tree_env(tree: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant and its original can share a size and an mtime second
    return env


def check_imports_own_kernels(python: str, tree: Path) -> None:
    """A camtl tree must import camtl (and camtl.kernels) from itself, never from an editable install elsewhere."""
    if not (tree / "camtl" / "__init__.py").is_file():
        return  # not a camtl tree (the runner's own tests use a toy one)
    code = "import camtl, camtl.kernels; print(camtl.__file__); print(camtl.kernels.__file__)"
    out = subprocess.run([python, "-c", code], cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"importing camtl in the copy {tree} failed:\n{out.stderr}")
    for line in out.stdout.split():
        if not Path(line).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the copy {tree} imports {line}, outside itself: the mutants would not be tested "
                               f"(is camtl/__init__.py's source-tree kernels binding intact?)")


def run_tests(python: str, tree: Path, tests: str, timeout: Optional[float]) -> dict:
    """Runs pytest on ``tests`` in tree; returns {"status": passed|failed|error|timeout, "seconds", "tail"}."""
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(tests)]
    start = time.monotonic()
    # Its own session, so that a timeout ends pytest and everything it started (DDP workers, compilers).
    proc = subprocess.Popen(cmd, cwd=tree, env=tree_env(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = {0: "passed", _PYTEST_FAILED: "failed"}.get(proc.returncode, "error")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    return {"status": status, "returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "tail": output[-3000:]}


VERDICT = {"failed": "caught", "error": "error", "timeout": "timeout", "passed": "survived"}


class Runner:
    def __init__(self, mutants: Sequence, python: str, jobs: int, timeout: Optional[float], root: Path,
                 keep: bool = False):
        self.mutants, self.python, self.jobs, self.timeout, self.root = mutants, python, jobs, timeout, root
        self.keep = keep
        self.lock = threading.Lock()
        self.done = 0

    def _say(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)

    def run(self) -> dict:
        workdir = Path(tempfile.mkdtemp(prefix="camtl-mutate-"))
        try:
            copies = queue.Queue()
            for j in range(self.jobs):
                tree = workdir / f"tree{j}"
                copy_tree(self.root, tree)
                if j == 0:
                    check_mutants(self.mutants, tree)  # the copy is what gets mutated: check it, not the live tree
                check_imports_own_kernels(self.python, tree)
                copies.put(tree)
            self._say(f"mutate: {len(self.mutants)} mutants, {self.jobs} job(s), copies in {workdir}")
            with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
                test_sets = sorted({m.tests for m in self.mutants})
                baselines = dict(zip(test_sets, pool.map(lambda t: self._baseline(copies, t), test_sets)))
                results = list(pool.map(lambda m: self._mutant(copies, m, baselines[m.tests]), self.mutants))
            return {"baselines": baselines, "mutants": results}
        finally:
            if self.keep:
                print(f"mutate: kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    def _baseline(self, copies: queue.Queue, tests: str) -> dict:
        tree = copies.get()
        try:
            result = run_tests(self.python, tree, tests, None)
        finally:
            copies.put(tree)
        self._say(f"baseline {result['status']:>8} {result['seconds']:7.1f}s  {tests}")
        return result

    def _limit(self, baseline: dict) -> float:
        return self.timeout if self.timeout else 3 * baseline["seconds"] + 60

    def _mutant(self, copies: queue.Queue, m, baseline: dict) -> dict:
        record = {"id": m.id, "file": m.file, "description": m.description, "tests": m.tests}
        if baseline["status"] != "passed":
            record.update(verdict="baseline", seconds=0.0, tail=baseline["tail"])
        else:
            tree = copies.get()
            path = tree / m.file
            original = path.read_text()
            try:
                path.write_text(original.replace(m.original, m.replacement, 1))
                result = run_tests(self.python, tree, m.tests, self._limit(baseline))
            finally:
                path.write_text(original)
                copies.put(tree)
            # pytest's short summary (-rfE by default) names the tests that caught it
            failed = [line for line in result["tail"].splitlines() if line.startswith(("FAILED ", "ERROR "))]
            record.update(verdict=VERDICT[result["status"]], seconds=result["seconds"], returncode=result["returncode"],
                          failed=failed, tail=result["tail"] if result["status"] != "failed" else "")
        with self.lock:
            self.done += 1
            print(f"[{self.done}/{len(self.mutants)}] {m.id:<5} {record['verdict']:<8} {record['seconds']:7.1f}s  "
                  f"{m.description}", flush=True)
        return record


def summary(records: Sequence[dict]) -> str:
    counts = {v: sum(r["verdict"] == v for r in records) for v in ORDER}
    judged = len(records) - counts["baseline"]
    killed = counts["caught"] + counts["error"] + counts["timeout"]
    score = f"{100.0 * killed / judged:.0f}%" if judged else "n/a"
    parts = ", ".join(f"{counts[v]} {v}" for v in ORDER if v != "baseline" or counts[v])
    return f"mutate: {len(records)} mutants: {parts}; score {score}"


def table(records: Sequence[dict]) -> str:
    lines = [f"{'id':<5} {'verdict':<8} {'seconds':>7}  {'file':<28} description"]
    for r in records:
        lines.append(f"{r['id']:<5} {r['verdict']:<8} {r['seconds']:7.1f}  {r['file']:<28} {r['description']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutant ids (e.g. A3,L7); default: all")
    parser.add_argument("--list", action="store_true", help="list the mutants (and check their snippets), run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant's tests (default: 3 x its baseline + 60)")
    parser.add_argument("--out", default=str(ROOT / ".benchmarks" / "mutate.json"), help="the JSON results file")
    parser.add_argument("--mutants", default=str(HERE / "mutants.py"), help="the mutant list (a MUTANTS list)")
    parser.add_argument("--root", default=str(ROOT), help="the working tree to copy (default: this checkout)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    root = Path(args.root).resolve()
    mutants = load_mutants(Path(args.mutants))
    if args.only:
        wanted = [i.strip() for i in args.only.split(",") if i.strip()]
        unknown = sorted(set(wanted) - {m.id for m in mutants})
        if unknown:
            parser.error(f"--only: unknown mutant ids {unknown}; --list shows them")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id:<5} {m.file:<30} {m.description}\n      tests: {m.tests}")
        try:
            check_mutants(mutants, root)
        except ListError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{len(mutants)} mutants; every snippet occurs exactly once in {root}")
        return 0
    try:
        outcome = Runner(mutants, args.python, args.jobs, args.timeout, root, keep=args.keep).run()
    except ListError as e:
        print(e, file=sys.stderr)
        return 2
    records = outcome["mutants"]
    print(table(records))
    line = summary(records)
    print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": line, "mutants": records, "baselines": outcome["baselines"]}, indent=1))
    print(f"mutate: results in {out}")
    return 1 if any(r["verdict"] in ("survived", "baseline") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
