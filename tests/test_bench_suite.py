"""The benchmark suite's machinery (benchmarks/suite.py, conftest.py, compare.py, report.py), on fake groups:
the row schema, ratios and target statuses, interleaved timing, the files of a run, a failing equivalence that
fails the run while a missed target does not, skip reasons, and the comparison of two runs."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from suite import Entry, Group, Target  # noqa: E402


def timed_group(published=(10.0, 12.0, 11.0), camtl=(2.0, 3.0, 2.5), hf=(1.5, 1.5, 1.5), matches=True):
    """A group whose entries carry their rounds already (nothing to time): published, camtl (checked), HF."""
    entries = [Entry("published", "published", "fwd+bwd", rounds_ms=list(published), tolerance="rtol 1e-4"),
               Entry("camtl", "camtl", "fwd+bwd", rounds_ms=list(camtl), matches_reference=matches, max_err=1e-6,
                     tolerance="rtol 1e-4", under_test=True),
               Entry("hf", "HF", "fwd+bwd", rounds_ms=list(hf))]
    targets = [Target("camtl >= 3x published", "camtl", "fwd+bwd", 3.0, True, suite.faster("camtl", "published")),
               Target("camtl <= 1.1x HF", "camtl", "fwd+bwd", 1.1, False, suite.slower("camtl", "hf")),
               Target("overhead >= 3", "camtl", "fwd+bwd", 3.0, True,
                      suite.overhead_removed("camtl", "published", "hf"), headline=True)]
    return Group("model", "step", "B=2", "cpu", "float32", entries, published="published", peer="hf",
                 targets=targets)


def test_rows_have_the_schema_ratios_with_their_spread_and_target_statuses():
    rows, targets = suite.evaluate(timed_group())
    assert [r["impl"] for r in rows] == ["published", "camtl", "hf"]
    for row in rows:
        assert set(suite.ROW_FIELDS) <= set(row), set(suite.ROW_FIELDS) - set(row)
        assert row["direction"] in suite.DIRECTIONS and row["rounds"] == 3
    published, camtl, hf = rows
    assert camtl["median_ms"] == 2.5 and camtl["iqr_ms"] == pytest.approx(0.5)
    assert camtl["ratio_vs_published"] == pytest.approx(11.0 / 2.5)
    # Paired by round: 10/2, 12/3, 11/2.5.
    assert (camtl["ratio_vs_published_low"], camtl["ratio_vs_published_high"]) == (4.0, 5.0)
    assert camtl["ratio_vs_peer"] == pytest.approx(1.5 / 2.5)
    assert published["ratio_vs_published"] is None and hf["ratio_vs_peer"] is None  # not against itself
    statuses = {t["text"]: t for t in targets}
    assert statuses["camtl >= 3x published"]["status"] == "met"
    assert statuses["camtl <= 1.1x HF"]["status"] == "missed"
    overhead = statuses["overhead >= 3"]
    assert overhead["value"] == pytest.approx((11.0 - 1.5) / (2.5 - 1.5)) and overhead["headline"]
    assert camtl["target"] == "camtl >= 3x published; camtl <= 1.1x HF; overhead >= 3"
    assert camtl["target_status"] == "met; missed; met" and published["target_status"] == "n/a"
    assert camtl["matches_reference"] is True and published["matches_reference"] is None


def test_a_bound_inside_the_rounds_range_is_not_resolved_and_no_time_is_na():
    # camtl/published per round: 4.5, 2.5, 3.5: the bound 3 lies inside.
    _, targets = suite.evaluate(timed_group(published=(9.0, 5.0, 7.0), camtl=(2.0, 2.0, 2.0)))
    assert targets[0]["value"] == pytest.approx(3.5) and targets[0]["status"] == "not resolved"
    assert (targets[0]["low"], targets[0]["high"]) == (2.5, 4.5)
    _, targets = suite.evaluate(timed_group(camtl=()))
    assert {t["status"] for t in targets} == {"n/a"}
    assert suite.judge(2.0, [2.0], 3.0, True) == "missed"  # one round: no spread, judged
    assert suite.judge(None, [], 3.0, True) == "n/a"
    # The overhead is undefined in a round where published ran faster than HF: that round's noise swamps it.
    _, targets = suite.evaluate(timed_group(published=(9.0, 1.0, 9.0), camtl=(1.0, 1.0, 1.0), hf=(0.5, 1.5, 0.5)))
    assert targets[2]["value"] == pytest.approx((9.0 - 0.5) / (1.0 - 0.5)) and targets[2]["status"] == "not resolved"
    assert suite.overhead_removed("c", "p", "h")({"c": 1.0, "p": 3.0, "h": 1.5}) == math.inf
    assert suite.overhead_removed("c", "p", "h")({"c": 1.0, "p": 1.0, "h": 1.5}) is None


def test_rows_whose_calls_hold_different_work_are_compared_per_unit_of_work():
    # A padded call holds 32 examples (1,000 real tokens); a packed call 64 (2,000): per call the packed one looks
    # slower, per real token it is faster: 2000/120 against 1000/100 tokens per ms in every round.
    entries = [Entry("published", "published", "fwd+bwd", rounds_ms=[100.0, 110.0, 90.0], work=1000.0),
               Entry("packed", "packed", "fwd+bwd", rounds_ms=[120.0, 132.0, 108.0], work=2000.0,
                     matches_reference=True),
               Entry("hf", "HF", "fwd+bwd", rounds_ms=[50.0, 55.0, 45.0], work=1000.0)]
    targets = [Target("packed >= 1.5x published's tokens/s", "packed", "fwd+bwd", 1.5, True,
                      suite.faster("packed", "published")),
               Target("HF <= 1.3x packed's tokens/s", "packed", "fwd+bwd", 1.3, False, suite.slower("packed", "hf"))]
    group = Group("epoch", "epoch", "s", "cpu", "float32", entries, published="published", peer="hf",
                  targets=targets, work_unit="real tokens")
    rows, results = suite.evaluate(group)
    published, packed, hf = rows
    assert packed["ratio_vs_published"] == pytest.approx(2000 / 120 / (1000 / 100))
    assert (packed["ratio_vs_published_low"], packed["ratio_vs_published_high"]) == pytest.approx((5 / 3, 5 / 3))
    assert packed["ratio_vs_peer"] == pytest.approx(2000 / 120 / (1000 / 50))
    assert packed["work_per_s"] == pytest.approx(2000 / 0.120) and hf["work_per_s"] == pytest.approx(1000 / 0.050)
    assert packed["median_ms"] == pytest.approx(60.0) and packed["time_unit"] == "ms per 1000 real tokens"
    assert [r["status"] for r in results] == ["met", "met"]
    assert results[1]["value"] == pytest.approx((1000 / 50) / (2000 / 120))  # HF tokens/s over packed
    md = suite.summary_markdown({"meta": {}, "rows": rows, "targets": results})
    assert "median ms per 1000 real tokens" in md and "real tokens/s" in md and "| 16,667 |" in md
    with pytest.raises(ValueError, match="'packed' .*work must be a positive number of real tokens"):
        suite.evaluate(Group("epoch", "epoch", "s", "cpu", "float32",
                             [Entry("packed", "packed", "fwd+bwd", rounds_ms=[1.0])], work_unit="real tokens"))


def _load(name):
    """A bench file of the suite, imported by path (its marks are registered by benchmarks/pytest.ini, not here)."""
    import importlib.util
    import warnings

    spec = importlib.util.spec_from_file_location(f"camtl_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        spec.loader.exec_module(module)
    return module


def packing_rows(bp, rounds_s, real_tokens=1206, batches=1):
    """Rows as bench_packing.run writes them from each row's round times (seconds over all batches), with its
    targets (add_targets: issue 11's verdicts)."""
    rows = []
    for impl in bp.IMPLS:
        ts = rounds_s[impl.key]
        rates = [real_tokens / t for t in ts]
        rows.append({"impl": impl.key, "name": impl.name, "shape": "quick", "batches": batches,
                     "real_tokens": real_tokens, "mean_length": real_tokens / (32 * batches),
                     "real_fraction_max": real_tokens / (32 * batches * 128), "tokens_per_s": bp._median(rates),
                     "best_tokens_per_s": max(rates), "tokens_per_s_rounds": rates,
                     "fwd_bwd_rounds_ms": [1e3 * t / batches for t in ts], "rounds": len(ts)})
        if impl.key != "hf" and impl.key != "camtl_packed":
            rows[-1].update({"pass": True, "max_err": 1e-4})
    bp.add_targets(rows)
    return rows


@pytest.mark.parametrize("rounds_s", [
    # /tmp/b/final2 (--quick, 2 rounds): a disturbed round made camtl packed 0.24x published by the mean of the
    # times and 1.63x by the mean of the rates (its real tokens/s).
    {"published": (1.094, 1.453), "camtl_max": (1.283, 4.460), "camtl_dynamic": (1.367, 4.568),
     "camtl_packed": (0.398, 10.005), "hf": (0.404, 2.239)},
    {"published": (2.0, 2.2, 1.9, 2.1), "camtl_max": (1.5, 1.6, 1.5, 1.4), "camtl_dynamic": (1.0, 1.1, 0.9, 1.0),
     "camtl_packed": (0.5, 0.9, 0.6, 0.55), "hf": (0.3, 0.35, 0.3, 0.6)},
    {"published": (2.0, 2.2, 1.9), "camtl_max": (1.5, 1.6, 1.5), "camtl_dynamic": (1.0, 1.1, 0.9),
     "camtl_packed": (0.6, 0.7, 0.65), "hf": (0.3, 0.35, 0.3)},
], ids=["final2", "even", "odd"])
def test_the_epoch_is_judged_on_real_tokens_per_second_as_issue_11_does(rounds_s):
    epoch = _load("test_epoch")
    bp = epoch.bp
    bp_rows = packing_rows(bp, rounds_s)
    head = bp_rows[0]
    rows, results = suite.evaluate(epoch.group_of(bp_rows))
    by = {r["impl"]: r for r in rows}
    tokens = {r["impl"]: r["tokens_per_s"] for r in bp_rows}
    for impl, row in by.items():
        if impl != "published":
            assert row["ratio_vs_published"] == pytest.approx(tokens[impl] / tokens["published"], rel=1e-9)
        if impl != "hf":
            assert row["ratio_vs_peer"] == pytest.approx(tokens[impl] / tokens["hf"], rel=1e-9)
        assert row.get("work_per_s") == pytest.approx(tokens[impl], rel=1e-9)
        assert row["median_ms"] * row["work_per_s"] == pytest.approx(1e6), "ms per 1000 real tokens"
    verdict = {True: "met", False: "missed", None: "not resolved"}
    published, hf = results
    assert published["value"] == pytest.approx(head["target_published"], rel=1e-9)
    assert (published["low"], published["high"]) == pytest.approx(
        (head["target_published_low"], head["target_published_high"]), rel=1e-9)
    assert published["status"] == verdict[head["target_published_met"]]
    # The suite's HF target is packed/HF in time, issue 11's HF/packed in tokens/s: the same number.
    assert hf["value"] == pytest.approx(head["target_hf"], rel=1e-9)
    assert hf["status"] == verdict[head["target_hf_met"]]
    packed = by["camtl_packed"]
    assert packed["target_status"] == f"{published['status']}; {hf['status']}"
    assert packed["time_unit"] == "ms per 1000 real tokens" and "ms per batch" not in packed["case"]


def test_the_overhead_is_paired_by_round():
    model = _load("test_model")

    def overhead(published, camtl, hf):
        group = timed_group(published, camtl, hf)
        group.targets = [model.overhead_target()]
        return suite.evaluate(group)[1][0]

    # /tmp/b/final2's model rows: in round 1 published ran faster than HF (no overhead to remove: undefined), in
    # round 2 (6868 - 371) / (4108 - 371) = 1.74. The medians of different rounds gave 0.91, outside every round.
    t = overhead(published=(2416.0, 6868.0), camtl=(5795.0, 4108.0), hf=(2468.0, 371.0))
    assert t["value"] == pytest.approx((6868 - 371) / (4108 - 371)) and t["low"] == t["high"] == t["value"]
    assert t["status"] == "not resolved"  # one round of two undefined
    # Rounds 9, 22/3 and 6.33: their median, not (11 - 1.5) / (3 - 1.5) = 6.33 of the medians.
    t = overhead(published=(10.0, 14.0, 11.0), camtl=(2.0, 4.5, 3.0), hf=(1.0, 3.0, 1.5))
    assert t["value"] == pytest.approx(11 / 1.5) and (t["low"], t["high"]) == pytest.approx((9.5 / 1.5, 9.0))
    assert t["status"] == "met" and t["headline"]
    # Two rounds, camtl below HF in one (inf): the lower middle, not the mean of 1.5 and inf.
    t = overhead(published=(10.0, 14.0), camtl=(7.0, 2.5), hf=(4.0, 3.0))
    assert (t["value"], t["low"], t["high"]) == (2.0, 2.0, math.inf) and t["status"] == "not resolved"


def test_the_cpu_model_bench_times_camtl_auto_once():
    import torch

    model = _load("test_model")
    cpu = torch.device("cpu")
    assert model.auto_is_torch(cpu)  # camtl.backends: auto picks a kernel for CUDA tensors only
    assert [i.key for i in model.cpu_implementations(cpu)] == ["published", "camtl", "hf"]


def test_time_interleaved_times_every_checked_entry_round_by_round():
    calls = []
    entries = [Entry("a", "a", "fwd", fn=lambda: calls.append("a")),
               Entry("b", "b", "fwd", fn=lambda: calls.append("b")),
               Entry("bad", "bad", "fwd", fn=lambda: calls.append("bad"), matches_reference=False),
               Entry("boom", "boom", "fwd", fn=lambda: 1 / 0)]
    suite.time_interleaved(entries, "cpu", rounds=4, warmup=1, min_round_s=0.0)
    assert [len(e.rounds_ms) for e in entries] == [4, 4, 0, 0]
    assert all(t > 0 for t in entries[0].rounds_ms)
    assert "bad" not in calls, "an entry that failed its check is not timed"
    assert entries[3].error.startswith("ZeroDivisionError")
    # warm-up and calibration (2 calls each), then rounds alternating a, b.
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 4


def test_results_are_written_as_json_csv_markdown_and_a_figure(tmp_path):
    rows, targets = suite.evaluate(timed_group())
    fail_rows, _ = suite.evaluate(timed_group(matches=False))
    results = suite.Results({"date": "2026-11-30T11:00:00", "torch_threads": 2, "cpus": 2,
                             "other_busy_cpus_mean": 0.4, "other_busy_cpus_max": 1.1, "load_samples": 7})
    for row in rows:
        results.add_row(dict(row, headline=True), targets)
    results.add_row(dict(fail_rows[1], case="other"))
    results.add_skip("test_attention.py::test_attention[a]", "needs a CUDA GPU")
    results.add_skip("test_attention.py::test_attention[b]", "needs a CUDA GPU")
    paths = results.write(str(tmp_path))
    assert [Path(p).name for p in paths] == ["results.json", "results.csv", "summary.md", "summary.png"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) >= {"meta", "rows"} and len(data["rows"]) == 4 and len(data["targets"]) == 3
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:len(suite.ROW_FIELDS)] == suite.ROW_FIELDS and len(table) == 4
    assert table[1]["impl"] == "camtl" and float(table[1]["median_ms"]) == 2.5
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Headline") < md.index("## Targets") < md.index("## Results") < md.index("## Skipped")
    assert "MISSED: camtl <= 1.1x HF" in md and "met: overhead >= 3" in md
    assert "test_attention.py::test_attention (2 cases): needs a CUDA GPU" in md
    assert "**Equivalence FAILED**" in md and "1.1 at most (7 samples)" in md
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_the_figure_labels_directions_draws_target_statuses_and_lists_skips():
    import plot

    rows, targets = suite.evaluate(timed_group())
    fwd = dict(rows[1], direction="fwd", median_ms=1.0, rounds_ms=[1.0])
    fig = plot.summary_figure({"meta": {}, "rows": rows + [fwd], "targets": targets,
                               "skipped": [{"test": "t.py::t[x]", "reason": "needs a CUDA GPU"}]})
    texts = [t.get_text() for sf in fig.subfigs for t in sf.texts]
    ax = fig.subfigs[0].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "camtl  [fwd+bwd]" in labels and "camtl  [fwd]" in labels
    assert [p.get_width() for p in ax.patches] == [11.0, 2.5, 1.5, 1.0]
    assert any("missed: camtl <= 1.1x HF" in t for t in texts) and any("met: camtl >= 3x" in t for t in texts)
    assert any("t.py::t (1 case): needs a CUDA GPU" in t for t in texts)
    judged = ax.patches[1]  # the camtl fwd+bwd bar: a missed target gives it a red edge
    assert judged.get_edgecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-3)


def test_load_sampler_counts_other_processes_only():
    sampler = suite.LoadSampler(period_s=0.05).start()
    busy = 0
    for i in range(300_000):  # this process busy: not counted as another's load
        busy += i
    import time

    time.sleep(0.2)
    stats = sampler.stop()
    assert stats["load_samples"] >= 2
    assert 0 <= stats["other_busy_cpus_mean"] <= stats["other_busy_cpus_max"] <= os.cpu_count()


def _run(rows_b_factor=1.0, spread=0.05, rounds=5):
    return [dict(zip(suite.ROW_KEY, ("m", "step", impl, "cpu", "float32", "B=2", "fwd+bwd")), name=impl,
                 median_ms=ms * rows_b_factor, iqr_ms=ms * spread, rounds=rounds)
            for impl, ms in (("camtl", 10.0), ("published", 40.0))]


def test_compare_marks_what_moved_more_than_the_noise(tmp_path, capsys):
    a = _run()
    b = [dict(a[0], median_ms=13.0), dict(a[1], median_ms=40.8)]  # +30% (noise 10%), +2%
    moved = {c["impl"]: c for c in suite.compare_rows(a, b)}
    assert moved["camtl"]["ratio"] == pytest.approx(1.3) and moved["camtl"]["moved"] == "slower"
    assert moved["published"]["moved"] == "" and moved["published"]["noise"] == pytest.approx(0.05 + 2.0 / 40.8)
    few = suite.compare_rows(_run(rounds=1), b)
    assert {c["moved"] for c in few} == {"?"}  # one round: no spread to judge by
    # compare.py: a results.json folder against a saved run found by its name.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"meta": {}, "rows": a}))
    saved = tmp_path / "storage" / "Linux-CPython-3.11-64bit"
    saved.mkdir(parents=True)
    (saved / "0001_after.json").write_text(json.dumps({"benchmarks": [], "camtl": {"meta": {}, "rows": b}}))
    assert compare.main([str(tmp_path / "a"), "after", "--storage", str(tmp_path / "storage")]) == 0
    out = capsys.readouterr().out
    assert "1.30" in out and "slower" in out and "2 rows in both runs; 1 moved" in out
    assert compare.main([str(tmp_path / "a"), "missing", "--storage", str(tmp_path / "storage")]) == 2
    assert "saved runs: after" in capsys.readouterr().err


def test_report_merges_the_parts_of_a_run(tmp_path):
    rows, targets = suite.evaluate(timed_group())
    for name, status in (("one", 0), ("two", 1)):
        part = suite.Results({"exit_status": status})
        part.add_row(dict(rows[0], bench=name), targets)
        part.write(str(tmp_path / name), figure=False)
    assert report.main([str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "absent"),
                        "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [r["bench"] for r in merged["rows"]] == ["one", "two"] and merged["meta"]["exit_status"] == 1
    assert (tmp_path / "all" / "summary.png").exists()


FAKE_BENCH = '''
import pytest
from suite import Entry, Group, Target, faster, time_interleaved


def build(matches):
    group = Group("fake", "add", "n=4", "cpu", "float32",
                  [Entry("published", "published", "fwd", fn=lambda: sum(range(50)), tolerance="exact"),
                   Entry("camtl", "camtl", "fwd", fn=lambda: sum(range(50)), matches_reference=matches,
                         max_err=0.0 if matches else 0.5, tolerance="exact", under_test=True)],
                  published="published",
                  targets=[Target("camtl >= 1000x published", "camtl", "fwd", 1000.0, True,
                                  faster("camtl", "published"))])
    time_interleaved(group.entries, "cpu", rounds=3)
    return group


@pytest.mark.parametrize("impl", ["published", "camtl"])
def test_missed_target(bench, impl):
    bench.report(("ok",), lambda: build(True), impl, "fwd")


@pytest.mark.parametrize("impl", ["published", "camtl"])
def test_mismatch(bench, impl):
    bench.report(("bad",), lambda: build(False), impl, "fwd")


def test_gpu_only(bench):
    pytest.skip("needs a CUDA GPU: fake reason")
'''


@pytest.fixture(scope="module")
def fake_suite(tmp_path_factory):
    """A folder with the suite's conftest.py and pytest.ini and one fake bench file."""
    root = tmp_path_factory.mktemp("suite")
    for name in ("conftest.py", "pytest.ini"):
        shutil.copy(ROOT / "benchmarks" / name, root / name)
    (root / "test_fake.py").write_text(textwrap.dedent(FAKE_BENCH))
    return root


def _pytest(root, out, *args, save="fake-run"):
    """pytest on the fake suite, in a fresh process (the plugin's hooks and exit status as `make bench` sees them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), "BENCH_SAVE": save}
    env.pop("BENCH_OUT", None)
    return subprocess.run([sys.executable, "-m", "pytest", str(root), "--bench-out", str(out), "--no-figure",
                           "--benchmark-storage", f"file://{root / 'storage'}", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)


def test_a_failed_equivalence_fails_the_run_and_a_missed_target_does_not(fake_suite):
    import xml.etree.ElementTree as ET

    out = fake_suite / "out"
    run = _pytest(fake_suite, out, "--junitxml", str(fake_suite / "junit.xml"))
    assert run.returncode == 1, run.stdout[-3000:]
    outcomes = {case.get("name"): [child.tag for child in case]
                for case in ET.parse(fake_suite / "junit.xml").getroot().iter("testcase")}
    assert outcomes == {"test_missed_target[published]": [], "test_missed_target[camtl]": [],
                        "test_mismatch[published]": [], "test_mismatch[camtl]": ["failure"],
                        "test_gpu_only": ["skipped"]}, "only the mismatch fails; a missed target passes"
    assert "camtl (fwd) does not match the reference at n=4: max err 5.000e-01 (exact)" in run.stdout
    assert "MISSED: camtl >= 1000x published" in run.stdout
    assert "torch threads on" in run.stdout  # the thread count is printed
    data = json.loads((out / "results.json").read_text())
    mismatched = [r for r in data["rows"] if r["matches_reference"] is False]
    assert len(mismatched) == 1 and mismatched[0]["rounds"] == 0, "a row that fails its check is not timed"
    assert [r["target_status"] for r in data["rows"] if r["case"] == "add" and r["rounds"]] == ["n/a", "missed", "n/a"]
    assert data["skipped"] == [{"test": "test_fake.py::test_gpu_only", "reason": "needs a CUDA GPU: fake reason"}]
    assert data["meta"]["torch_threads"] >= 1 and data["meta"]["run_name"] == "fake-run"
    assert "**Equivalence FAILED**" in (out / "summary.md").read_text()
    # pytest-benchmark's JSON, and the run saved under its name with the suite's rows: compare.py finds it.
    bench_json = json.loads((out / "pytest-benchmark.json").read_text())
    assert [b["stats"]["rounds"] for b in bench_json["benchmarks"]] == [3, 3, 3]
    saved = compare.find_run("fake-run", fake_suite / "storage")
    assert [r["impl"] for r in compare.load_rows(saved)] == ["published", "camtl", "published", "camtl"]


def test_run_py_keeps_its_command_line_and_runs_the_suite():
    import run

    command = run.pytest_command("out", quick=True, only=["epoch", "model"], no_plot=True)
    assert command[1:3] == ["-m", "pytest"] and command[3:5] == [str(ROOT / "benchmarks" / "test_epoch.py"),
                                                                 str(ROOT / "benchmarks" / "test_model.py")]
    assert command[5:] == ["--bench-out", "out", "--quick", "--no-figure"]
    assert run.pytest_command("o")[3] == str(ROOT / "benchmarks")
    assert sorted(f"test_{name}.py" for name in run.BENCHES) == sorted(
        p.name for p in (ROOT / "benchmarks").glob("test_*.py"))
