"""Runner for ``make bench``: every bench, one table each, optional JSON results.

    python benchmarks/run.py [--out DIR] [--quick] [--only NAME ...] [--no-plot]

Each bench in BENCHES is a module in this folder exposing
``run(device, quick) -> list[dict]`` (a row has a boolean "pass" when it checks
equivalence) and ``print_table(rows)``. With --out, the JSON results are also drawn
into DIR/summary.png (benchmarks/plot.py). Exits 1 if any row failed its check.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time

# The benches import each other by plain name (`from common import ...`), also under `python -m`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from camtl.info import collect  # noqa: E402
from common import setup_threads  # noqa: E402

BENCHES = [
    "bench_modules",
    "bench_attention",
    "bench_norm_adapter",
    "bench_model",
    "bench_packing",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="DIR", help="write DIR/<bench>.json (rows, environment, date)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions: a smoke test")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHES,
                        help="run only these benches (scripts/gpu_check.py runs each under its own time limit)")
    parser.add_argument("--no-plot", action="store_true", help="no summary figure (draw it later: benchmarks/plot.py DIR)")
    args = parser.parse_args(argv)
    benches = [name for name in BENCHES if args.only is None or name in args.only]

    threads = setup_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = collect()
    env["torch_threads"] = threads
    for key in ("camtl", "torch", "triton", "python", "device"):
        print(f"{key:<13} {env[key]}")
    print(f"{'torch threads':<13} {threads}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    failed = []
    start = time.perf_counter()
    for name in benches:
        bench = importlib.import_module(name)
        rows = bench.run(device, args.quick)
        bench.print_table(rows)
        failed += [f"{name}: {row.get('module') or row.get('name') or row.get('impl')}"
                   for row in rows if row.get("pass") is False]
        if args.out:
            path = os.path.join(args.out, f"{name}.json")
            with open(path, "w") as f:
                json.dump({"bench": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           "quick": args.quick, "environment": env, "rows": rows}, f, indent=2)
            print(f"wrote {path}")

    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    if args.out and not args.no_plot:
        try:
            from plot import plot_results

            print(f"wrote {plot_results(args.out, benches=benches)}")
        except ImportError:
            print("no summary figure: pip install matplotlib, then python benchmarks/plot.py " + args.out)
        except Exception as exc:  # noqa: BLE001  (a figure must not hide the results above)
            print(f"no summary figure: {type(exc).__name__}: {exc}")
    if failed:
        print("equivalence FAILED: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
