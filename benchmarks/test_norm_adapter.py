"""Conditional layer norm, FiLM and the FiLM bottleneck (issue 3): camtl's Triton kernels and CUDA extension
(camtl._C, issue 10) against camtl's torch backend, the published loops and the unconditioned bounds, in bf16 on a
GPU; each checked (output and every gradient) against the fp32 torch backend (bench_norm_adapter's tolerances)
before it is timed."""

import functools

import pytest
import torch

import bench_norm_adapter as bn
from common import grad_step, op_entries
from suite import Group, Target, faster, slower

import camtl

pytestmark = [pytest.mark.ops, pytest.mark.gpu]
CPU_REASON = ("needs a CUDA GPU: on the CPU the fused kernels run only under Triton's interpreter, too slow to "
              "time")
IMPLS = {"cln": ("camtl", "cuda", "torch", "published", "bound"), "bottleneck": ("camtl", "published", "bound"),
         "film": ("camtl", "cuda", "torch", "published", "bound")}


def shapes(quick: bool):
    return bn.SHAPES[:1] if quick else bn.SHAPES


def pytest_generate_tests(metafunc):
    metafunc.parametrize("shape", shapes(metafunc.config.getoption("quick")), ids=str)
    metafunc.parametrize("op,impl", [(op, impl) for op, impls in IMPLS.items() for impl in impls])
    metafunc.parametrize("direction", ("fwd", "fwd+bwd"))


@functools.lru_cache(maxsize=None)
def copy_gbs(device_type: str, quick: bool) -> float:
    """The device's copy bandwidth (bench_norm_adapter.copy_bandwidth), measured once per run."""
    return bn.copy_bandwidth(torch.device(device_type), quick, bn.COPY_BYTES[False])["copy_gbs"]


def targets(op: str, shape: bn.Shape, dtype: torch.dtype, copy: float):
    """bench_norm_adapter.TARGETS with their bounds: the camtl row's fwd+bwd."""
    if op == "film":
        return []
    if op == "bottleneck":
        return [Target("bottleneck <= 1.3x two plain Linear, fwd+bwd", "camtl", "fwd+bwd", 1.3, False,
                       slower("camtl", "bound"))]
    nbytes = bn.cln_bytes(shape, dtype)[1]

    def pct_copy(ms):
        return 100 * nbytes / (ms["camtl"] * 1e-3) / 1e9 / copy if ms.get("camtl") else None

    return [Target("CLN >= 70% of copy bandwidth, fwd+bwd", "camtl", "fwd+bwd", 70, True, pct_copy, unit="%"),
            Target("CLN <= 1.1x F.layer_norm + add, fwd+bwd", "camtl", "fwd+bwd", 1.1, False,
                   slower("camtl", "bound")),
            Target(f"CLN >= 10x faster than the published loop ({bn.NUM_TASKS} tasks), fwd+bwd", "camtl",
                   "fwd+bwd", 10, True, faster("camtl", "published"))]


def build_group(op: str, shape: bn.Shape, dtype: torch.dtype, device: torch.device, rounds: int,
                copy: float) -> Group:
    from suite import time_interleaved

    x = bn.make_inputs(shape, dtype, device)
    grad_out = torch.randn(shape.B, shape.L, shape.D, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(device=device, dtype=dtype)
    x32 = {k: (t.detach().float().requires_grad_() if t.is_floating_point() else t) for k, t in x.items()}
    fn, leaves = bn.REFERENCES[op]
    with camtl.use_backend("torch"):
        ref = {k: t.detach() for k, t in grad_step(fn, leaves, x32, grad_out.float()).items()}
    entries = op_entries(bn.implementations(device)[op], x, ref, grad_out, dtype, under_test=bn.CAMTL_KEYS)
    group = Group("norm_adapter", bn.TITLES[op], str(shape), device.type, str(dtype)[6:], entries,
                  published="published", peer="bound", targets=targets(op, shape, dtype, copy))
    time_interleaved(group.entries, device, rounds)
    return group


def test_norm_adapter(bench, shape, op, impl, direction):
    if bench.device.type != "cuda":
        pytest.skip(CPU_REASON)
    if impl == "cuda" and bn.cuda_backend_problem(bench.device):
        pytest.skip(bn.cuda_backend_problem(bench.device))
    rounds = 10 if bench.quick else 20
    copy = copy_gbs(bench.device.type, bench.quick)
    bench.report(("norm_adapter", op, str(shape)),
                 lambda: build_group(op, shape, torch.bfloat16, bench.device, rounds, copy), impl, direction)
