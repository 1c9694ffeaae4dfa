"""Compares two benchmark runs row by row: the ratio of every row's median, and what moved more than the noise.

    python benchmarks/compare.py A B [--storage DIR]

A and B are each a run's name (its BENCH_SAVE or timestamp: the newest NNNN_<name>.json in pytest-benchmark's
storage, default .benchmarks/), a saved run's path, a results.json, or a folder holding one (BENCH_OUT). Rows are
matched on (bench, case, impl, device, dtype, shape, direction). B/A > 1: B is slower. The noise of a row is the
sum of both runs' IQR / median; a ratio further from 1 than that is marked "faster" or "slower", "?" where a run
has fewer than 3 rounds (no spread to judge by).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import compare_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def find_run(name: str, storage: Path) -> Path:
    """The file of run ``name``: a path as given, else the newest saved run of that name in ``storage``."""
    path = Path(name)
    if path.is_dir():
        path = path / "results.json"
    if path.is_file():
        return path
    saved = sorted(storage.glob(f"*/[0-9][0-9][0-9][0-9]_{name}.json"), key=lambda p: p.name)
    if not saved:
        known = sorted(p.stem.split("_", 1)[1] for p in storage.glob("*/[0-9][0-9][0-9][0-9]_*.json"))
        raise FileNotFoundError(f"no run named {name!r} in {storage} (saved runs: {', '.join(known) or 'none'}) "
                                f"and no such file or folder")
    return saved[-1]


def load_rows(path: Path) -> List[dict]:
    """The suite's rows of a results.json or of a pytest-benchmark saved run (its "camtl" entry)."""
    data = json.loads(path.read_text())
    if "camtl" in data:
        data = data["camtl"]
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a benchmark run (no rows): written by another tool?")
    return data["rows"]


def table(compared: Sequence[dict]) -> str:
    header = f"{'row':<78} {'A ms':>10} {'B ms':>10} {'B/A':>6} {'noise':>6}  moved"
    lines = [header, "-" * len(header)]
    for c in compared:
        label = f"{c['name']} [{c['direction']}] {c['bench']} {c['case']}, {c['shape']}, {c['dtype']} {c['device']}"
        if len(label) > 78:
            label = label[:75] + "..."
        noise = "-" if c["noise"] is None else f"{100 * c['noise']:.0f}%"
        lines.append(f"{label:<78} {c['a_ms']:>10.4g} {c['b_ms']:>10.4g} {c['ratio']:>6.2f} {noise:>6}  {c['moved']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="the earlier run: a name, a saved run, a results.json or its folder")
    parser.add_argument("b", help="the later run")
    parser.add_argument("--storage", default=str(ROOT / ".benchmarks"), help="pytest-benchmark's storage folder")
    args = parser.parse_args(argv)
    try:
        paths = [find_run(name, Path(args.storage)) for name in (args.a, args.b)]
        rows = [load_rows(p) for p in paths]
    except (OSError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    compared = compare_rows(*rows)
    print(f"A: {paths[0]}\nB: {paths[1]}\n")
    if not compared:
        print("no row was timed in both runs")
        return 0
    print(table(compared))
    moved = [c for c in compared if c["moved"] in ("faster", "slower")]
    print(f"\n{len(compared)} rows in both runs; {len(moved)} moved by more than the noise "
          f"({sum(c['moved'] == 'faster' for c in moved)} faster, {sum(c['moved'] == 'slower' for c in moved)} slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
