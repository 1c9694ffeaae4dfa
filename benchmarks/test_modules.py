"""camtl.nn drop-in modules against the published algorithm (bench_modules): each pair checked equal (output and
the gradients of inputs and parameters, fp32 at the timed shape and fp64 at a smaller one) before it is timed;
camtl on its torch backend (the algorithm, not kernels). CPU and GPU."""

import pytest
import torch

import bench_modules as bm
import camtl
from common import TOLERANCES
from suite import Entry, Group, time_interleaved

pytestmark = pytest.mark.ops
CASES = {case.name: case for case in bm.CASES}


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("quick")
    metafunc.parametrize("module", list(CASES))
    metafunc.parametrize("shape", [bm.SHAPES[quick]], ids=lambda s: str(s[0]))
    metafunc.parametrize("impl", ("published", "camtl"))
    metafunc.parametrize("direction", ("fwd", "fwd+bwd"))


def tolerance_text() -> str:
    (r32, a32), (r64, a64) = TOLERANCES[torch.float32], TOLERANCES[torch.float64]
    return f"fp32 rtol {r32:g} atol {a32:g}, fp64 rtol {r64:g} atol {a64:g} (atol x max|ref| per tensor)"


def build_group(case: bm.Case, shape: bm.Shape, shape64: bm.Shape, device: torch.device, rounds: int) -> Group:
    (ok64, err64, _), _ = bm.check(case, shape64, torch.float64, device)
    (ok32, err32, _), (published, ours, x, grad_out) = bm.check(case, shape, torch.float32, device)
    entries = []
    for impl, module in (("published", published), ("camtl", ours)):
        check = {} if impl == "published" else dict(matches_reference=ok32 and ok64, max_err=max(err32, err64),
                                                    under_test=True)
        common = dict(context=lambda: camtl.use_backend("torch"), tolerance=tolerance_text(), **check)
        entries.append(Entry(impl, f"{impl} {case.name}", "fwd", lambda m=module: case.forward(m, x), **common))
        entries.append(Entry(impl, f"{impl} {case.name}", "fwd+bwd",
                             lambda m=module: bm._step(case, m, x, grad_out), **common))
    group = Group("modules", case.name, str(shape), device.type, "float32", entries, published="published")
    time_interleaved(group.entries, device, rounds)
    return group


def test_module(bench, module, shape, impl, direction):
    rounds = {(False, False): 11, (False, True): 3, (True, False): 30, (True, True): 10}[
        (bench.device.type == "cuda", bench.quick)]
    bench.report(("modules", module, str(shape[0])),
                 lambda: build_group(CASES[module], *shape, bench.device, rounds), impl, direction)
