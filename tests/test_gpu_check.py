"""scripts/gpu_check.py (make gpu-check): its time budget, its kill on time-out, and what its summary states.

The check itself needs a GPU; its orchestration does not, so it is tested here with stand-in parts.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("camtl_gpu_check", ROOT / "scripts" / "gpu_check.py")


def _part(name, code, budget):
    return gpu_check.Part(name, [sys.executable, "-c", code], budget, f"{name}.log")


def test_parts_run_in_order_and_a_slow_one_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child-survived"
    # The slow part starts a grandchild that would write the marker after 3 s: the kill must take it too.
    slow = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"\"import time, pathlib; time.sleep(3); pathlib.Path(r'{marker}').write_text('x')\"]); time.sleep(60)")
    parts = [_part("first", "print('hello')", 20), _part("broken", "import sys; sys.exit(3)", 20),
             _part("slow", slow, 1.5), _part("after", "pass", 20)]
    start = time.monotonic()
    outcomes = gpu_check.run_parts(parts, tmp_path, total_budget_s=60, echo=lambda line: None)
    elapsed = time.monotonic() - start
    assert [(o.name, o.status) for o in outcomes] == [
        ("first", "ok"), ("broken", "failed"), ("slow", "timed out"), ("after", "ok")]
    assert "exit status 3" in outcomes[1].detail
    assert (tmp_path / "first.log").read_text().strip() == "hello"
    assert elapsed < 20, f"the slow part was not killed on time ({elapsed:.1f} s)"
    time.sleep(3.5)
    assert not marker.exists(), "a child of the timed-out part kept running"


def test_the_total_budget_bounds_every_part_and_what_is_left_is_not_run(tmp_path):
    parts = [_part("long", "import time; time.sleep(60)", 50), _part("next", "pass", 50)]
    start = time.monotonic()
    outcomes = gpu_check.run_parts(parts, tmp_path, total_budget_s=1.5, echo=lambda line: None)
    assert time.monotonic() - start < 15
    assert [(o.name, o.status) for o in outcomes] == [("long", "timed out"), ("next", "not run")]
    assert "budget was spent" in outcomes[1].detail


def test_a_failed_install_stops_the_other_parts(tmp_path):
    parts = [_part("install", "import sys; sys.exit(1)", 20), _part("tests/gpu", "pass", 20)]
    outcomes = gpu_check.run_parts(parts, tmp_path, total_budget_s=60, echo=lambda line: None)
    assert [(o.name, o.status) for o in outcomes] == [("install", "failed"), ("tests/gpu", "not run")]


def test_summary_states_what_did_not_run_or_pass(tmp_path):
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.test_a" name="test_ok"/>'
        '<testcase classname="tests.gpu.test_a" name="test_flex"><skipped message="FlexAttention needs torch 2.5"/>'
        '</testcase>'
        '<testcase classname="tests.gpu.test_b" name="test_bad"><failure message="assert 1 == 2&#10;more"/>'
        '</testcase></testsuite></testsuites>')
    model = tmp_path / "benchmarks" / "model"
    model.mkdir(parents=True)
    (model / "results.json").write_text(json.dumps({
        "rows": [{"name": "camtl torch", "direction": "fwd+bwd", "shape": "s", "matches_reference": True},
                 {"name": "camtl triton", "direction": "fwd+bwd", "shape": "s", "matches_reference": False},
                 {"name": "published", "direction": "fwd+bwd", "shape": "s", "error": "OutOfMemoryError: ..."}],
        "skipped": [{"test": "test_model.py::test_model[a]", "reason": "needs a CUDA GPU"},
                    {"test": "test_model.py::test_model[b]", "reason": "needs a CUDA GPU"}]}))
    outcomes = [gpu_check.Outcome("install", "ok", 3.0, "install.log"),
                gpu_check.Outcome("bench_attention", "timed out", 70.0, "killed after 70 s")]
    text = gpu_check.summary(outcomes, tmp_path, 400)
    assert "| bench_attention | timed out | 70.0 |" in text
    assert "skipped: tests.gpu.test_a::test_flex - FlexAttention needs torch 2.5" in text
    assert "failed: tests.gpu.test_b::test_bad - assert 1 == 2" in text
    assert "model: camtl triton [fwd+bwd] at s failed its equivalence check" in text
    assert "model: published [fwd+bwd] at s not run: OutOfMemoryError" in text
    assert "model: 2 cases skipped: needs a CUDA GPU" in text
    assert "camtl torch" not in text
    assert "test_ok" not in text
    clean = gpu_check.summary([gpu_check.Outcome("install", "ok", 3.0, "install.log")], tmp_path / "none", 400)
    assert "nothing: every part ran and passed" in clean


def test_the_plan_fits_seven_minutes_and_runs_every_bench(tmp_path, monkeypatch):
    monkeypatch.delenv("CAMTL_CUDA_ARCHS", raising=False)
    parts = gpu_check.plan(tmp_path, sys.executable)
    assert sum(p.budget_s for p in parts) <= gpu_check.TOTAL_BUDGET_S <= 7 * 60 - 20
    bench_files = sorted(p.command[p.command.index("pytest") + 1] for p in parts if "pytest" in p.command
                         and "tests/gpu" not in p.command)
    assert bench_files == sorted(str(f.relative_to(ROOT)) for f in (ROOT / "benchmarks").glob("test_*.py")), \
        "every bench file of the suite gets a budgeted part"
    for part in parts:
        if "--bench-out" in part.command:  # each its own results table, merged by the summary part
            assert part.command[part.command.index("--bench-out") + 1] == str(tmp_path / "benchmarks" /
                                                                              part.name.split()[-1])
    summary = parts[-1]
    assert summary.name == "benchmark summary" and summary.command[-1] == str(tmp_path / "benchmarks")
    names = [p.name for p in parts]
    assert names[:3] == ["install", "environment", "tests/gpu"] and "kernel report" in names
    assert gpu_check.plan(tmp_path, sys.executable, "80")[0].env == {"CAMTL_CUDA_ARCHS": "80"}
    report = {p.name: p for p in parts}["kernel report"].command
    assert report[-2:] == ["--arch", "sm_90a"]  # this GPU's arch only: the whole report is too long for its budget
    assert {p.name: p for p in gpu_check.plan(tmp_path, sys.executable, "100")}["kernel report"].command[-1] != \
        "--arch"  # an arch the report does not know: its defaults
    kernel_report = _load("camtl_kernel_report", ROOT / "scripts" / "kernel_report.py")
    assert {f"sm_{a}" for a in gpu_check.KERNEL_REPORT_ARCHS} == set(kernel_report.ARCHS)


def test_a_part_gets_its_environment(tmp_path):
    part = gpu_check.Part("env", [sys.executable, "-c", "import os; print(os.environ['CAMTL_PROBE'])"], 20,
                          "env.log", env={"CAMTL_PROBE": "set-by-the-part"})
    (outcome,) = gpu_check.run_parts([part], tmp_path, total_budget_s=60, echo=lambda line: None)
    assert outcome.status == "ok" and (tmp_path / "env.log").read_text().strip() == "set-by-the-part"


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.fail("this test is for CPU machines (CI); tests/gpu covers the GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device is visible to torch" in proc.stderr
    assert not (tmp_path / "o").exists()
