#!/usr/bin/env python
"""make gpu-check: everything a GPU session should run, within a fixed time budget, into one folder.

On a CUDA machine with torch, triton and transformers preinstalled (no network), it runs these parts in
order, each in its own process group under its own time limit, and writes their output to $GPU_CHECK_OUT
(default gpu-check-out/):

    part                 budget (s)   writes
    install                  55       install.log         pip install --no-deps --no-build-isolation -e .
                                                          (camtl._C for this GPU's arch only, when nvcc is here)
    environment              10       environment.txt     date, nvidia-smi, camtl info
    tests/gpu                95       gpu-tests.txt/.xml  pytest tests/gpu (junit XML: what ran and was skipped)
    bench <name>, each      25-70     benchmarks/<name>/  pytest benchmarks/test_<name>.py (the suite's results
                                                          table of that file, and pytest-benchmark's JSON)
    kernel report            40       kernel-report/      scripts/kernel_report.py, compiled on this machine's CPUs
                                                          for this GPU's arch
    benchmark summary        10       benchmarks/         benchmarks/report.py: the parts' rows merged into one
                                                          results.json/.csv, summary.md and summary.png

The budgets sum to 400 s, so the whole check ends within 7 minutes on one H100 / H200 (about 20 s of
margin for the interpreter start and the summary). A part that runs out of time is killed (its process
group, children included) and the next part starts; a part never gets more than what is left of the total.
The budgets are estimates made without a GPU: summary.md lists the seconds each part took, so the next
GPU session can resize them.

summary.md (also printed) states, for every part: ok, failed (exit status), timed out, or not run and why;
the GPU tests that failed or were skipped, with their reasons; the benchmark rows that failed their
equivalence check or did not run; and the benchmarks skipped, with their reasons. The exit status is 0 only
if every part ran and passed.

    python scripts/gpu_check.py [--out DIR] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 400.0
BENCH_BUDGETS_S = {  # benchmarks/test_<name>.py; FlexAttention's torch.compile happens inside attention
    "modules": 25,
    "attention": 70,
    "norm_adapter": 25,
    "model": 35,
    "epoch": 35,
}
KERNEL_REPORT_ARCHS = ("90a", "80", "86")  # scripts/kernel_report.py's ARCHS, as CAMTL_CUDA_ARCHS spells them
BENCH_DIR = "benchmarks"  # inside the output folder: a folder per bench file, and the merged table


@dataclasses.dataclass
class Part:
    name: str
    command: List[str]
    budget_s: float
    log: str  # file name inside the output folder (stdout and stderr together)
    env: Optional[Dict[str, str]] = None  # added to the environment


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timed out | not run
    seconds: float
    detail: str


def plan(out: Path, python: str, cuda_arch: str = "90a") -> List[Part]:
    """The parts of a GPU check, in order, with their budgets; camtl._C is built for cuda_arch only."""
    parts = [
        Part("install", [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], 55,
             "install.log", env={"CAMTL_CUDA_ARCHS": os.environ.get("CAMTL_CUDA_ARCHS", cuda_arch)}),
        Part("environment", ["bash", "-c", f'date -u +"%Y-%m-%dT%H:%M:%SZ"; nvidia-smi || true; '
                                           f'"{python}" -m camtl info'], 10, "environment.txt"),
        Part("tests/gpu", [python, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rs",
                           "--junitxml", str(out / "gpu-tests.xml")], 95, "gpu-tests.txt"),
    ]
    for bench, budget in BENCH_BUDGETS_S.items():
        parts.append(Part(f"bench {bench}", [python, "-m", "pytest", f"benchmarks/test_{bench}.py", "--bench-out",
                                             str(out / BENCH_DIR / bench), "--no-figure", "--benchmark-storage",
                                             f"file://{out / BENCH_DIR / 'storage'}"],
                          budget, f"bench-{bench}.txt", env={"BENCH_SAVE": f"gpu-check-{bench}"}))
    # This GPU's arch only, when the report knows it: both default archs are 6 to 9.5 CPU-minutes cold (2-core
    # machine), too close to 40 s even on 16 cores; one is half that.
    report_arch = ["--arch", f"sm_{cuda_arch}"] if cuda_arch in KERNEL_REPORT_ARCHS else []
    parts.append(Part("kernel report", [python, "scripts/kernel_report.py", "--out", str(out / "kernel-report"),
                                        "--no-progress", "--jobs", str(os.cpu_count() or 2), *report_arch], 40,
                      "kernel-report.txt"))
    parts.append(Part("benchmark summary", [python, "benchmarks/report.py",
                                            *[str(out / BENCH_DIR / bench) for bench in BENCH_BUDGETS_S],
                                            "--out", str(out / BENCH_DIR)], 10, "bench-summary.txt"))
    return parts


def run_part(part: Part, out: Path, seconds_left: float) -> Outcome:
    """Runs one part under min(its budget, seconds_left); kills its whole process group on time-out."""
    limit = min(part.budget_s, seconds_left)
    if limit < 1.0:
        return Outcome(part.name, "not run", 0.0, "the total time budget was spent")
    start = time.monotonic()
    with open(out / part.log, "wb") as log:
        proc = subprocess.Popen(part.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(part.env or {})})
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Outcome(part.name, "timed out", time.monotonic() - start,
                           f"killed after {limit:.0f} s (budget {part.budget_s:.0f} s); see {part.log}")
    seconds = time.monotonic() - start
    if rc == 0:
        return Outcome(part.name, "ok", seconds, part.log)
    return Outcome(part.name, "failed", seconds, f"exit status {rc}; see {part.log}")


def run_parts(parts: Sequence[Part], out: Path, total_budget_s: float, echo=print) -> List[Outcome]:
    """Runs the parts in order within total_budget_s; a failed install stops the rest (nothing else can run)."""
    deadline = time.monotonic() + total_budget_s
    outcomes: List[Outcome] = []
    for part in parts:
        if outcomes and outcomes[0].name == "install" and outcomes[0].status != "ok":
            outcomes.append(Outcome(part.name, "not run", 0.0, "camtl did not install"))
            continue
        outcome = run_part(part, out, deadline - time.monotonic())
        echo(f"gpu-check: {outcome.name:<20} {outcome.status:<9} {outcome.seconds:6.1f} s  {outcome.detail}")
        outcomes.append(outcome)
    return outcomes


def junit_problems(xml_path: Path) -> List[str]:
    """'failed: test - message' / 'skipped: test - reason' for each test that did not pass."""
    if not xml_path.exists():
        return []
    problems = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error", "skipped"):
            for element in case.findall(kind):
                message = (element.get("message") or "").strip().splitlines()
                word = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                problems.append(f"{word}: {test} - {message[0] if message else kind}")
    return problems


def bench_failures(out: Path) -> List[str]:
    """The benchmark rows that failed their equivalence check or did not run, and the skipped benchmarks, from
    each bench part's results.json."""
    failures = []
    for bench in BENCH_BUDGETS_S:
        path = out / BENCH_DIR / bench / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            what = f"{row.get('name') or row.get('impl')} [{row.get('direction')}] at {row.get('shape')}"
            if row.get("matches_reference") is False:
                failures.append(f"{bench}: {what} failed its equivalence check")
            elif row.get("error"):
                failures.append(f"{bench}: {what} not run: {row['error']}")
        reasons: Dict[str, int] = {}
        for skip in data.get("skipped", []):
            reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
        failures += [f"{bench}: {n} case{'s' * (n > 1)} skipped: {reason}" for reason, n in reasons.items()]
    return failures


def summary(outcomes: Sequence[Outcome], out: Path, total_budget_s: float) -> str:
    total = sum(o.seconds for o in outcomes)
    lines = ["# gpu-check summary", "",
             f"total {total:.0f} s of a {total_budget_s:.0f} s budget", "",
             "| part | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.1f} | {o.detail} |" for o in outcomes]
    not_run = [o for o in outcomes if o.status != "ok"]
    lines += ["", "## What did not run or did not pass", ""]
    items = [f"- {o.name}: {o.status} ({o.detail})" for o in not_run]
    items += [f"- {p}" for p in junit_problems(out / "gpu-tests.xml")]
    items += [f"- {f}" for f in bench_failures(out)]
    lines += items or ["- nothing: every part ran and passed"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu-check-out"))
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="total seconds (default %(default)s)")
    args = parser.parse_args(argv)
    python = sys.executable
    try:
        import torch
    except ImportError as exc:
        print(f"gpu-check: torch does not import in {python} ({exc}); this check uses the preinstalled torch",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device is visible to torch in {python}; this check needs a GPU "
              "(on a CPU machine: make test, make kernel-report)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a: Hopper's wgmma-capable target
    outcomes = run_parts(plan(out, python, arch), out, args.budget)
    text = summary(outcomes, out, args.budget)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"gpu-check: results in {out}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
