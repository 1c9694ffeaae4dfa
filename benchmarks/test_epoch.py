"""Issue 8's epoch on GLUE-like lengths (bench_packing, always on the CPU): real tokens per second of the published
algorithm padded to 128, camtl padded to 128, dynamically padded and packed, and the HF BertModel floor, fwd+bwd in
interleaved rounds; each row checked against camtl packed (loss, sequence output on the real tokens, pooled output,
every parameter gradient; bench_model's fp32 tolerances) before it is timed.

The rows are compared on real tokens per second, issue 11's measure: the median of the rounds' rates, their
ratios and targets as bench_packing.add_targets computes them, and shown as ms per 1000 real tokens (1000 / that
median). The median of the rounds' times disagrees with it for an even number of rounds (two rounds: the mean
of the times against the mean of the rates; a disturbed round swings them apart)."""

import functools

import pytest
import torch

import bench_packing as bp
from common import TOLERANCES
from suite import Entry, Group, Target, faster, slower

pytestmark = pytest.mark.epoch
ROUNDS = {False: 5, True: 3}  # timed rounds after a warm-up round; odd, so the median is one round
BATCHES = {False: 2, True: 1}  # quick: one batch of 32 (the run under 2 minutes on 2 cores)
WORK_UNIT = "real tokens"


def pytest_generate_tests(metafunc):
    metafunc.parametrize("impl", [impl.key for impl in bp.IMPLS])


@functools.lru_cache(maxsize=None)
def epoch_group(quick: bool) -> Group:
    with torch.random.fork_rng():
        rows = bp.run(torch.device("cpu"), quick, rounds=ROUNDS[quick], batches=BATCHES[quick])
    return group_of(rows)


def group_of(rows) -> Group:
    """The suite's group of bench_packing.run's rows (checked and timed)."""
    rtol, atol = TOLERANCES[torch.float32]
    head = rows[0]
    entries = []
    for r in rows:
        checked = "pass" in r or r["impl"] == "camtl_packed"  # camtl packed: the reference (False if a row differs)
        # fwd_bwd_rounds_ms: a round's time over all the batches / their number; the real tokens per batch likewise.
        entries.append(Entry(
            r["impl"], r["name"], "fwd+bwd", matches_reference=r.get("pass"),
            max_err=r.get("max_err"), error=r.get("error"), under_test=r["impl"] in bp.CAMTL_KEYS,
            tolerance=f"fp32 rtol {rtol:g} atol {atol:g} (atol x max|ref| per tensor), vs camtl packed"
            if checked else "", rounds_ms=list(r.get("fwd_bwd_rounds_ms", [])),
            work=r["real_tokens"] / r["batches"]))
    shape = (f"{head['shape']}; {head['batches']} batches, mean length {head['mean_length']:.1f}, real tokens "
             f"{100 * head['real_fraction_max']:.0f}% of padded-to-128")
    targets = [
        Target(f"camtl packed >= {bp.TARGET_PUBLISHED:g}x the published algorithm's real tokens/s", "camtl_packed",
               "fwd+bwd", bp.TARGET_PUBLISHED, True, faster("camtl_packed", "published")),
        Target(f"HF floor <= {bp.TARGET_HF:g}x camtl packed's real tokens/s", "camtl_packed", "fwd+bwd",
               bp.TARGET_HF, False, slower("camtl_packed", "hf")),
    ]
    return Group("epoch", "GLUE-shaped epoch", shape, "cpu", "float32", entries, published="published", peer="hf",
                 targets=targets, headline=True, work_unit=WORK_UNIT)


def test_epoch(bench, impl):
    bench.report(("epoch",), lambda: epoch_group(bench.quick), impl, "fwd+bwd")
