"""Writes one results table (results.json, results.csv, summary.md, summary.png) from one or more runs' results.json.

    python benchmarks/report.py RUN_DIR [RUN_DIR ...] --out DIR

scripts/gpu_check.py runs each bench file as its own part (its own time limit, its own BENCH_OUT) and merges them
here; with one RUN_DIR it redraws that run's summary (after an edit of plot.py, say).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import Results  # noqa: E402


def merge(run_dirs: Sequence[Path]) -> Results:
    """The rows, targets and skipped tests of every run that wrote a results.json, in the order given; the meta
    of the first, with the parts listed and the worst exit status."""
    merged: Optional[Results] = None
    parts = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if merged is None:
            merged = Results(data.get("meta", {}))
        merged.rows += data.get("rows", [])
        merged.targets += data.get("targets", [])
        merged.skipped += data.get("skipped", [])
        status = data.get("meta", {}).get("exit_status")
        parts.append({"dir": str(run_dir), "exit_status": status})
        if status:
            merged.meta["exit_status"] = max(status, merged.meta.get("exit_status") or 0)
    if merged is None:
        raise FileNotFoundError(f"no results.json in {', '.join(map(str, run_dirs))}")
    merged.meta["parts"] = parts
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders holding a results.json")
    parser.add_argument("--out", type=Path, required=True, help="where the merged table goes")
    args = parser.parse_args(argv)
    try:
        results = merge(args.runs)
    except FileNotFoundError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    for path in results.write(str(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
