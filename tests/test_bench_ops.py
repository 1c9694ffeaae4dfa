"""The GPU op benches' groups (benchmarks/test_norm_adapter.py), built on the CPU at bench_norm_adapter's smoke
shape under the Triton interpreter: every row checked, the bounds not checked, then timed, targets judged."""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import suite  # noqa: E402


def _load(name):
    """A bench file of the suite, imported by path (its marks are registered by benchmarks/pytest.ini, not here)."""
    spec = importlib.util.spec_from_file_location(f"camtl_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module


def test_norm_adapter_groups_check_then_time_every_row():
    bench = _load("test_norm_adapter")
    shape = bench.bn.SMOKE_SHAPE
    assert set(bench.IMPLS) == {"cln", "bottleneck", "film"}
    # No camtl._C device here: the cuda rows are left out, and their tests skip saying why.
    assert "the cuda backend is off" in bench.bn.cuda_backend_problem(torch.device("cpu"))
    for op, impls in bench.IMPLS.items():
        group = bench.build_group(op, shape, torch.float32, torch.device("cpu"), rounds=2, copy=100.0)
        rows, targets = suite.evaluate(group)
        by = {(r["impl"], r["direction"]): r for r in rows}
        assert set(by) == {(i, d) for i in impls if i != "cuda" for d in ("fwd", "fwd+bwd")}
        for (impl, _), row in by.items():
            assert row["matches_reference"] is (None if impl == "bound" else True), row
            assert row["rounds"] == 2 and row["median_ms"] > 0 and "error" not in row
        assert all(t["status"] in suite.STATUSES and t["value"] is not None for t in targets)
        assert by[("camtl", "fwd+bwd")]["ratio_vs_peer"] is not None


def test_a_wrong_kernel_row_fails_its_check(monkeypatch):
    bench = _load("test_norm_adapter")
    real = bench.bn.cln_camtl
    # The camtl rows condition on the wrong tasks: they must not match the reference (which the torch backend
    # computes through the same function, so the swap is keyed on the backend in use).
    def wrong(x):
        from camtl.backends import resolve

        if resolve("conditional_layer_norm", x["x"].device)[0] == "triton":
            x = dict(x, index=(x["index"] + 1) % bench.bn.NUM_TASKS)
        return real(x)

    monkeypatch.setattr(bench.bn, "cln_camtl", wrong)
    group = bench.build_group("cln", bench.bn.SMOKE_SHAPE, torch.float32, torch.device("cpu"), rounds=1, copy=100.0)
    rows, _ = suite.evaluate(group)
    camtl = [r for r in rows if r["impl"] == "camtl"]
    assert [r["matches_reference"] for r in camtl] == [False, False] and all(r["rounds"] == 0 for r in camtl)
    assert all(r["matches_reference"] for r in rows if r["impl"] in ("torch", "published"))
