"""benchmarks/plot.py: summary.png of a benchmark run, from its results.json."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from plot import bench_order, plot_results, summary_figure  # noqa: E402


def _row(bench, impl, ms, direction="fwd+bwd", headline=False, **kw):
    return {"bench": bench, "case": "c", "impl": impl, "name": impl, "device": "cpu", "dtype": "float32",
            "shape": "s", "direction": direction, "median_ms": ms, "rounds_ms": [ms * 0.9, ms, ms * 1.2],
            "headline": headline, **kw}


ROWS = [_row("modules", "published", 500.0), _row("modules", "camtl", 2.0, matches_reference=False),
        _row("epoch", "camtl_packed", 30.0, headline=True, time_unit="ms per 1000 real tokens", work_per_s=1234.0,
             work_unit="real tokens")]


def test_headline_benches_come_first():
    assert bench_order(ROWS) == ["epoch", "modules"]
    target = {"bench": "modules", "headline": True}
    assert bench_order([_row("epoch", "x", 1.0), _row("modules", "y", 1.0)], [target]) == ["modules", "epoch"]


def test_each_bench_a_panel_with_its_bars_whiskers_and_failures():
    fig = summary_figure({"meta": {"camtl": "0.1", "quick": True}, "rows": ROWS, "targets": [], "skipped": []})
    epoch_ax, modules_ax = (sf.axes[0] for sf in fig.subfigs if sf.axes)
    assert "epoch (headline)" == epoch_ax.get_title(loc="left")
    assert [p.get_width() for p in modules_ax.patches] == [500.0, 2.0]
    assert modules_ax.get_xscale() == "log"  # 500 ms and 2 ms: decades apart
    texts = [t.get_text() for t in modules_ax.texts]
    assert sum("FAIL (equivalence)" in t for t in texts) == 1
    assert any("30 ms, 1,234 real tokens/s" in t.get_text() for t in epoch_ax.texts)
    assert epoch_ax.get_xlabel().startswith("median ms per 1000 real tokens;")
    assert modules_ax.get_xlabel().startswith("median ms per call;")
    assert "(quick)" in fig._suptitle.get_text()


def test_plot_results_reads_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json in"):
        plot_results(str(tmp_path))
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "rows": ROWS}))
    out = plot_results(str(tmp_path))
    assert out == str(tmp_path / "summary.png") and (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
