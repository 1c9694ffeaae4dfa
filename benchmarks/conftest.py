"""pytest plugin of the benchmark suite (``pytest benchmarks/``, ``make bench``).

Options: ``--quick`` (small shapes, few rounds: under 2 minutes on a 2-core CPU), ``--bench-out DIR`` (default
$BENCH_OUT or .benchmarks/latest). Marks: ops, model, epoch, gpu. Each run is saved in pytest-benchmark's storage
(.benchmarks/<machine>/NNNN_<name>.json) under $BENCH_SAVE or a timestamp, with this suite's rows inside
("camtl"); BENCH_OUT gets pytest-benchmark.json, results.json, results.csv, summary.md and summary.png.

A test reports one implementation of a group (suite.Group) in one direction through the ``bench`` fixture: the
group is built, checked and timed once, by its first test. A failed equivalence check fails its test (so the run
exits non-zero); a missed speed target does not. A test that cannot run here is skipped with its reason, which
summary.md and the figure list.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import suite  # noqa: E402

ROOT = HERE.parent
DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default, relative to the working directory


def pytest_addoption(parser):
    group = parser.getgroup("camtl benchmarks")
    group.addoption("--quick", action="store_true", help="small shapes and few rounds: a smoke run")
    group.addoption("--bench-out", metavar="DIR", default=os.environ.get("BENCH_OUT") or ".benchmarks/latest",
                    help="where results.json/.csv, summary.md/.png go (default: $BENCH_OUT or .benchmarks/latest)")
    group.addoption("--no-figure", action="store_true", help="no summary.png")


def _run_name() -> str:
    return os.environ.get("BENCH_SAVE") or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's configure reads its options
def pytest_configure(config):
    out = Path(config.getoption("bench_out"))
    if hasattr(config.option, "benchmark_save"):  # pytest-benchmark is installed (pyproject's test extra)
        if not config.option.benchmark_save and not config.option.benchmark_autosave:
            config.option.benchmark_save = _run_name()
        if config.option.benchmark_json is None:
            out.mkdir(parents=True, exist_ok=True)
            config.option.benchmark_json = out / "pytest-benchmark.json"
        if config.option.benchmark_storage == DEFAULT_STORAGE:
            config.option.benchmark_storage = f"file://{ROOT / '.benchmarks'}"
    import torch

    from common import setup_threads

    threads = setup_threads()
    meta = {"date": suite.now_iso(), "quick": config.getoption("quick"), "torch_threads": threads,
            "cpus": os.cpu_count(), "run_name": getattr(config.option, "benchmark_save", None),
            "args": list(config.invocation_params.args)}
    try:
        from camtl.info import collect

        env = collect()
        meta.update({k: env.get(k) for k in ("camtl", "torch", "triton", "python", "device")})
    except Exception as exc:  # noqa: BLE001  (the environment is information, not a result)
        meta.update({"torch": torch.__version__, "environment_error": suite.error_text(exc)})
    config._camtl_results = suite.Results(meta)
    config._camtl_groups = {}
    config._camtl_load = suite.LoadSampler().start()
    config._camtl_out = out
    _CONFIG["config"] = config


def pytest_report_header(config):
    meta = config._camtl_results.meta
    return [f"camtl benchmarks: {meta['torch_threads']} torch threads on {meta['cpus']} CPUs, device "
            f"{meta.get('device', '?')}, quick={meta['quick']}, results into {config._camtl_out}, run saved as "
            f"{meta.get('run_name')}"]


def _finish_meta(config) -> None:
    meta = config._camtl_results.meta
    if "load_samples" not in meta:
        meta.update(config._camtl_load.stop())


_CONFIG: Dict[str, object] = {}  # the run's config, for the hooks that are not given it


def pytest_runtest_logreport(report):
    config = _CONFIG.get("config")
    if config is None:
        return
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        config._camtl_results.add_skip(report.nodeid, reason.removeprefix("Skipped: "))
    # The rows so far, after each test: a run killed on time (gpu-check's parts) keeps them.
    if report.when == "teardown" and config._camtl_results.rows:
        config._camtl_results.write_json(str(config._camtl_out))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """pytest-benchmark's saved run carries this suite's rows, so that compare.py can read a run by its name."""
    _finish_meta(config)
    output_json["camtl"] = config._camtl_results.as_json()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    _finish_meta(config)
    if config.option.collectonly:  # nothing ran: keep the last run's files
        return
    results = config._camtl_results
    results.meta["exit_status"] = int(exitstatus)
    config._camtl_written = results.write(str(config._camtl_out), figure=not config.getoption("no_figure"))


def pytest_terminal_summary(terminalreporter, config):
    results = config._camtl_results
    write = terminalreporter.write_line
    terminalreporter.section("camtl benchmarks")
    write(suite.noise_text(results.meta))
    for t in results.targets:
        write(f"target: {suite.target_text(t)} [{t['bench']} {t['shape']} {t['direction']} on {t['device']}]")
    failed = [r for r in results.rows if r.get("matches_reference") is False]
    for r in failed:
        write(f"equivalence FAILED: {suite.row_label(r)} {r['impl']} {r['direction']}: max err {r.get('max_err')}")
    for path in getattr(config, "_camtl_written", []):
        write(f"wrote {path}")
    for note in results.meta.get("notes", []):
        write(note)


# ---- the fixture the benches use ---------------------------------------------------------------------------------

class Bench:
    """What a bench test needs: the device, --quick, and ``report`` (build the group once, then this row)."""

    def __init__(self, config, benchmark):
        self.config = config
        self.benchmark = benchmark
        if benchmark is not None:  # the suite times, not pytest-benchmark's loop: no "fixture was not used" warning
            benchmark._mode = "rounds timed by benchmarks/suite.py"
        self.quick: bool = config.getoption("quick")
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def group(self, key: Tuple, build: Callable[[], suite.Group]):
        cache = self.config._camtl_groups
        if key not in cache:
            try:
                group = build()
                rows, targets = suite.evaluate(group) if group.skip_reason is None else ([], [])
                cache[key] = (group, rows, targets, None)
            except Exception as exc:  # noqa: BLE001  (every test of the group reports it)
                cache[key] = (None, [], [], suite.error_text(exc))
                raise
        group, rows, targets, error = cache[key]
        if error is not None:
            pytest.fail(f"building the group failed: {error}", pytrace=False)
        return group, rows, targets

    def report(self, key: Tuple, build: Callable[[], suite.Group], impl: str, direction: str) -> dict:
        """Records the row of (impl, direction); fails if it does not match the reference, skips if it cannot run."""
        group, rows, targets = self.group(key, build)
        if group.skip_reason:
            pytest.skip(group.skip_reason)
        entry = group.entry(impl, direction)
        if entry is None:
            pytest.skip(f"{group.bench} {group.case}: {impl} has no {direction} on {group.device}")
        row = rows[group.entries.index(entry)]
        if entry.error and not entry.under_test and entry.matches_reference is not False:
            pytest.skip(f"{entry.name} ({direction}) did not run: {entry.error}")
        self.config._camtl_results.add_row(row, targets)
        self._feed_benchmark(row)
        if entry.matches_reference is False:
            pytest.fail(f"{entry.name} ({direction}) does not match the reference at {group.shape}: max err "
                        f"{suite.fmt(entry.max_err, '.3e')} ({entry.tolerance})", pytrace=False)
        if entry.error:
            pytest.fail(f"{entry.name} ({direction}), the code under test, failed: {entry.error}", pytrace=False)
        return row

    def _feed_benchmark(self, row: dict) -> None:
        """Hands the row's rounds to pytest-benchmark (its JSON, storage and table): timed here, not by its loop."""
        fixture = self.benchmark
        if fixture is None or not fixture.enabled or not row.get("rounds_ms"):
            return
        fixture.group = f"{row['bench']} {row['case']} {row['shape']} {row['dtype']} {row['direction']}"
        fixture.extra_info.update({k: row.get(k) for k in suite.ROW_FIELDS + suite.EXTRA_FIELDS
                                   if not isinstance(row.get(k), (list, dict))})
        stats = fixture._make_stats(1)  # pytest-benchmark's own record of a round (no public API for given times)
        for ms in row["rounds_ms"]:
            stats.update(ms / 1e3)


@pytest.fixture
def bench(request):
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:  # pytest-benchmark missing: the suite's own files still get written
        benchmark = None
    return Bench(request.config, benchmark)
