"""benchmarks/plot.py: the summary figure of a make bench run, from its JSON results."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from plot import bars_of, plot_results, summary_figure  # noqa: E402

MODULES = [{"module": "FiLM", "pass": True, "published_fwd_bwd_ms": 11.0, "camtl_fwd_bwd_ms": 6.5},
           {"module": "CBDA", "pass": False, "published_fwd_bwd_ms": 3.5, "camtl_fwd_bwd_ms": 2.5}]
MODEL = [{"impl": "published", "name": "published algorithm", "shape": "s", "dtype": "float32", "fwd_bwd_ms": 1500.0,
          "fwd_bwd_rounds_ms": [1400.0, 1500.0, 1700.0]},
         {"impl": "torch", "name": "camtl torch backend", "shape": "s", "dtype": "float32", "fwd_bwd_ms": 1300.0,
          "fwd_bwd_rounds_ms": [1250.0, 1300.0, 1320.0], "pass": True}]
SKIPPED = [{"impl": "-", "shape": "s", "device": "cpu", "note": "needs a CUDA GPU"}]


def test_bars_of_each_bench():
    bars = bars_of("bench_modules", MODULES)
    assert [(b.group, b.label, b.ms, b.failed) for b in bars] == [
        ("FiLM", "published", 11.0, False), ("FiLM", "camtl", 6.5, False),
        ("CBDA", "published", 3.5, False), ("CBDA", "camtl", 2.5, True)]
    model = bars_of("bench_model", MODEL)
    assert [(b.label, b.ms, b.low, b.high) for b in model] == [("published algorithm", 1500.0, 1400.0, 1700.0),
                                                               ("camtl torch backend", 1300.0, 1250.0, 1320.0)]
    assert model[0].group == "s float32"
    assert bars_of("bench_attention", SKIPPED) == []


def test_summary_figure_has_a_panel_per_bench_with_data():
    fig = summary_figure({"bench_model": {"rows": MODEL, "environment": {"camtl": "0.1"}, "date": "2026-11-23T21"},
                          "bench_modules": {"rows": MODULES}, "bench_attention": {"rows": SKIPPED}})
    model_ax, modules_ax = fig.axes
    assert [p.get_width() for p in model_ax.patches] == [1500.0, 1300.0]
    assert [p.get_width() for p in modules_ax.patches] == [11.0, 6.5, 3.5, 2.5]
    assert any(t.get_text().endswith("FAIL") for t in modules_ax.texts)
    assert sum(t.get_text().endswith("FAIL") for t in modules_ax.texts + model_ax.texts) == 1
    assert modules_ax.get_xscale() == "linear" and "bench_model: s float32" in model_ax.get_title(loc="left")


def test_plot_results_writes_a_png(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <bench>.json in"):
        plot_results(str(tmp_path))
    for name, rows in (("bench_model", MODEL), ("bench_modules", MODULES)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"bench": name, "rows": rows}))
    (tmp_path / "notes.json").write_text('{"not": "a bench"}')  # skipped
    (tmp_path / "broken.json").write_text("{")  # skipped
    out = plot_results(str(tmp_path))
    assert out == str(tmp_path / "summary.png") and (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError):
        plot_results(str(tmp_path), benches=["bench_attention"])  # only the benches asked for
