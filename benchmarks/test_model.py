"""The CA-MTL-base encoder step (bench_model): camtl (best backend, torch backend) against the published algorithm
and a plain HF BertModel at equal shapes, each camtl row checked against the published one in fp32 (loss, both
outputs, every parameter gradient; bench_model's tolerances) before it is timed.

CPU: fwd+bwd in bench_model's interleaved rounds (bench_model.run_cpu). The headline target is the conditioning
overhead at equal shapes, (published - HF) / (camtl - HF) >= 3: the share of the published algorithm's extra cost
that camtl removes, computed within each round (its value: the median of the rounds'). On the CPU ``auto`` runs
every op on the torch backend, so the camtl torch-backend row would time the auto row's code again: it is not
timed (skipped, saying so), and the auto row's label names the torch backend. GPU: BERT-base, bf16 autocast, fwd+bwd and the train step (+ fused AdamW) timed with CUDA
events, one model on the device at a time, with its peak memory; issue 5's targets on the train step.
"""

import functools

import pytest
import torch

import bench_model as bm
import camtl
from camtl import backends as camtl_backends
from common import TOLERANCES
from suite import Entry, Group, Target, faster, overhead_removed, slower, time_interleaved

pytestmark = pytest.mark.model
IMPLS = ("published", "camtl", "torch", "hf")
CASES = ("fwd+bwd", "train step (+AdamW)")
CPU_ROUNDS = {False: 7, True: 2}  # interleaved rounds after a warm-up round (bench_model.run_cpu)
GPU_ROUNDS = {False: 15, True: 5}
OVERHEAD_TARGET = 3.0


TWIN_SKIP = ("on the CPU camtl auto runs every op on the torch backend: the 'camtl auto' row is this code, timed "
             "once")


def auto_is_torch(device: torch.device) -> bool:
    """Whether ``auto`` resolves every camtl op to the torch backend on ``device`` (always on the CPU)."""
    with camtl.use_backend("auto"):
        return {camtl_backends.resolve(op, device)[0] for op in camtl_backends._IMPLS} == {"torch"}


def cpu_implementations(device: torch.device):
    """bench_model's rows, less the torch-backend row where auto is the torch backend (the same code twice)."""
    impls = bm.implementations(device, smoke=False)
    return [i for i in impls if i.key != "torch"] if auto_is_torch(device) else impls


def pytest_generate_tests(metafunc):
    metafunc.parametrize("case", CASES)
    metafunc.parametrize("impl", IMPLS)


def tolerance_text() -> str:
    rtol, atol = TOLERANCES[torch.float32]
    return f"fp32 rtol {rtol:g} atol {atol:g} (atol x max|ref| per tensor), vs the published model"


def _entry(row: dict, direction: str, **kwargs) -> Entry:
    return Entry(row["impl"], row["name"], direction, matches_reference=row.get("pass"), max_err=row.get("max_err"),
                 tolerance=tolerance_text() if "pass" in row or row.get("check") == "reference" else "",
                 error=row.get("error"),
                 under_test=row["impl"] in bm.CAMTL_KEYS, **kwargs)


@functools.lru_cache(maxsize=None)
def cpu_group(quick: bool) -> Group:
    shape, device = bm.CPU_SHAPES[quick], torch.device("cpu")
    weights = bm.published_weights(shape)
    b = bm.make_batch(shape, device)
    impls = cpu_implementations(device)
    rows = bm.run_cpu(shape, impls, weights, b, device, quick, CPU_ROUNDS[quick])
    for r in rows:
        if r["impl"] == "camtl" and r.get("backends") == "torch" and "torch" not in {i.key for i in impls}:
            r["name"] = "camtl auto (= torch backend on the CPU)"
    entries = [_entry(r, "fwd+bwd", rounds_ms=list(r.get("fwd_bwd_rounds_ms", [])),
                      extra={"best_ms": r.get("best_ms")}) for r in rows]
    return Group("model", "encoder fwd+bwd", str(shape), "cpu", "float32", entries, published="published",
                 peer="hf", targets=[overhead_target()], headline=True)


def overhead_target() -> Target:
    """The CPU headline: paired by round (a difference of medians taken from different rounds means nothing)."""
    return Target(f"conditioning overhead removed: (published - HF) / (camtl - HF) >= {OVERHEAD_TARGET:g}",
                  "camtl", "fwd+bwd", OVERHEAD_TARGET, True, overhead_removed("camtl", "published", "hf"),
                  headline=True, paired=True)


@functools.lru_cache(maxsize=None)
def gpu_groups(quick: bool, device_type: str):
    """{case: Group}: each row's model alone on the device; fwd+bwd and train step timed in interleaved rounds."""
    device, shape, autocast = torch.device(device_type), bm.GPU_SHAPE, torch.bfloat16
    weights = bm.published_weights(shape)
    b = bm.make_batch(shape, device)
    ref = bm.reference(shape, weights, b, device)
    entries = {case: [] for case in CASES}
    peaks = {}
    for impl in bm.implementations(device, smoke=False):
        base = torch.cuda.memory_allocated(device)
        prep, _ = bm.prepare(impl, shape, weights, b, ref, device, autocast)
        row, model = prep.row, prep.model
        context = functools.partial(bm.row_context, impl, device, autocast)
        fwd_bwd, step = (_entry(row, "fwd+bwd", context=context) for _ in CASES)
        if model is not None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=bm.LR, fused=True)
            fwd_bwd.fn = bm.make_step(impl.kind, model, b)
            step.fn = bm.make_step(impl.kind, model, b, optimizer)
            try:
                with context():
                    step.fn()  # the AdamW state: the peak below is a steady-state step's
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    step.fn()
                    torch.cuda.synchronize(device)
                peaks[impl.key] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
                step.extra["peak_mib"] = peaks[impl.key]
            except Exception as exc:  # noqa: BLE001
                step.error = fwd_bwd.error = bm.error_text(exc)
            time_interleaved([fwd_bwd, step], device, GPU_ROUNDS[quick])
            fwd_bwd.fn = step.fn = optimizer = None
        entries[CASES[0]].append(fwd_bwd)
        entries[CASES[1]].append(step)
        prep.model = model = None
        bm._free(device)

    def memory(ms):
        return peaks["camtl"] / peaks["hf"] if peaks.get("camtl") and peaks.get("hf") else None

    step_targets = [
        Target("camtl train step >= 5x faster than the published algorithm", "camtl", "fwd+bwd", 5.0, True,
               faster("camtl", "published"), headline=True),
        Target("camtl train step <= 1.25x the HF BertModel (SDPA) step", "camtl", "fwd+bwd", 1.25, False,
               slower("camtl", "hf"), headline=True),
        Target("camtl peak memory <= 1.15x the HF BertModel peak", "camtl", "fwd+bwd", 1.15, False, memory,
               headline=True),
    ]
    dtype = "bfloat16 autocast"
    return {CASES[0]: Group("model", "encoder fwd+bwd", str(shape), device.type, dtype, entries[CASES[0]],
                            published="published", peer="hf"),
            CASES[1]: Group("model", "encoder train step (+AdamW)", str(shape), device.type, dtype,
                            entries[CASES[1]], published="published", peer="hf", targets=step_targets)}


def test_model(bench, case, impl):
    if bench.device.type == "cuda":
        bench.report(("model", case), lambda: gpu_groups(bench.quick, bench.device.type)[case], impl, "fwd+bwd")
    elif case != CASES[0]:
        pytest.skip("the train step (+AdamW) is timed on a GPU only: on the CPU AdamW costs every row the same")
    elif impl == "torch" and auto_is_torch(bench.device):
        pytest.skip(TWIN_SKIP)
    else:
        bench.report(("model", case), lambda: cpu_group(bench.quick), impl, "fwd+bwd")
