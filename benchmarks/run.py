"""The former runner of ``make bench``, kept for its command line: it runs the pytest-benchmark suite.

    python benchmarks/run.py [--out DIR] [--quick] [--only NAME ...] [--no-plot]

is ``python -m pytest benchmarks/[test_NAME.py ...] --bench-out DIR [--quick] [--no-figure]``; the exit status
is pytest's (non-zero when an equivalence check failed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The bench files of the suite, by the names --only takes.
BENCHES = ["modules", "attention", "norm_adapter", "model", "epoch"]


def pytest_command(out: str, quick: bool = False, only=None, no_plot: bool = False) -> list:
    files = [str(HERE / f"test_{name}.py") for name in only] if only else [str(HERE)]
    return ([sys.executable, "-m", "pytest", *files, "--bench-out", out] + (["--quick"] if quick else [])
            + (["--no-figure"] if no_plot else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="DIR", default=".benchmarks/latest")
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHES, help="run only these bench files")
    parser.add_argument("--no-plot", action="store_true", help="no summary.png")
    args = parser.parse_args(argv)
    return subprocess.call(pytest_command(args.out, args.quick, args.only, args.no_plot))


if __name__ == "__main__":
    sys.exit(main())
