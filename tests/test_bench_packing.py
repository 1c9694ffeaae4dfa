"""benchmarks/bench_packing.py at a tiny size: the mixture, the equivalence check (and that it can fail), the targets."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_packing  # noqa: E402


def test_mixture_follows_glue_sizes_and_lengths():
    tasks, lengths = bench_packing.sample_mixture(40_000, 128, torch.Generator().manual_seed(1))
    sizes = torch.tensor([float(t[2]) for t in bench_packing.TASKS])
    share = torch.bincount(tasks, minlength=8).double() / len(tasks)
    torch.testing.assert_close(share, (sizes / sizes.sum()).double(), rtol=0, atol=0.01)
    assert int(lengths.min()) >= bench_packing.MIN_LEN and int(lengths.max()) <= 128
    for t, (name, mean, _) in enumerate(bench_packing.TASKS):
        if (tasks == t).sum() > 500:  # the big tasks: their sample mean is precise
            assert abs(lengths[tasks == t].double().mean().item() / mean - 1) < 0.06, name


def test_smoke_rows_check_and_report(capsys):
    rows = bench_packing.run(torch.device("cpu"), quick=True, smoke=True)
    by_key = {r["impl"]: r for r in rows}
    assert list(by_key) == [i.key for i in bench_packing.IMPLS]
    for key in ("published", "camtl_max", "camtl_dynamic"):
        assert by_key[key]["check"] == "ok" and by_key[key]["pass"] is True, by_key[key]
    assert by_key["camtl_packed"]["check"] == "reference" and "pass" not in by_key["camtl_packed"]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)
    head = rows[0]
    assert 0 < head["real_fraction_max"] <= head["real_fraction_dynamic"] <= 1
    expected = rows[3]["tokens_per_s"] / rows[0]["tokens_per_s"]
    assert head["target_published"] == pytest.approx(expected)
    assert head["target_published_met"] is (expected >= bench_packing.TARGET_PUBLISHED)  # one round: always judged
    bench_packing.print_table(rows)
    out = capsys.readouterr().out
    assert "camtl, packed" in out and out.count("target:") == 2


def test_a_row_that_differs_fails(monkeypatch):
    make_step = bench_packing.make_step

    def wrong_tasks(impl, model, batch, L):  # the dynamically padded row conditions on the wrong tasks
        if impl.key == "camtl_dynamic":
            batch = dataclasses.replace(batch, tasks=(batch.tasks + 1) % len(bench_packing.TASKS))
        return make_step(impl, model, batch, L)

    monkeypatch.setattr(bench_packing, "make_step", wrong_tasks)
    rows = {r["impl"]: r for r in bench_packing.run(torch.device("cpu"), quick=True, smoke=True)}
    assert rows["camtl_dynamic"]["check"] == "FAIL" and rows["camtl_dynamic"]["pass"] is False
    assert rows["camtl_packed"]["pass"] is False  # the reference disagrees with a row: the bench fails
    assert rows["camtl_max"]["pass"] is True and rows["published"]["pass"] is True
