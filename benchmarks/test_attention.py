"""Conditional attention (issue 3): camtl's fused Triton kernel against SDPA flash (no bias: the bound), SDPA with a
dense bias, FlexAttention and the published block_diag, in bf16 on a GPU; each checked (output, dq, dk, dv, dtable)
against the fp32 torch reference (bench_attention's tolerances) before it is timed."""

import pytest
import torch

import bench_attention as ba
from common import grad_step, op_entries
from suite import Group, Target, faster, slower

pytestmark = [pytest.mark.ops, pytest.mark.gpu]
IMPLS = ("camtl", "flash", "sdpa_bias", "flex", "published")
CPU_REASON = ("needs a CUDA GPU: on the CPU the fused kernel runs only under Triton's interpreter, too slow to "
              "time")
# The fwd+bwd targets for camtl (bench_attention.TARGETS, with their bounds).
TARGETS = [
    Target("camtl <= 1.15x SDPA flash (no bias), fwd+bwd", "camtl", "fwd+bwd", 1.15, False, slower("camtl", "flash"),
           headline=True),
    Target("camtl >= 2x faster than FlexAttention, fwd+bwd", "camtl", "fwd+bwd", 2.0, True, faster("camtl", "flex"),
           headline=True),
    Target("camtl >= 3x faster than SDPA + dense bias, fwd+bwd", "camtl", "fwd+bwd", 3.0, True,
           faster("camtl", "sdpa_bias"), headline=True),
]


def shapes(quick: bool):
    return ba.SHAPES[:1] if quick else ba.SHAPES


def pytest_generate_tests(metafunc):
    metafunc.parametrize("shape", shapes(metafunc.config.getoption("quick")), ids=str)
    metafunc.parametrize("impl", IMPLS)
    metafunc.parametrize("direction", ("fwd", "fwd+bwd"))


def build_group(shape: ba.Shape, dtype: torch.dtype, device: torch.device, rounds: int) -> Group:
    """bench_attention's inputs, reference and implementations at ``shape``: checked, then timed."""
    from suite import time_interleaved

    x = ba.make_inputs(shape, dtype, device)
    grad_out = torch.randn(x["q"].shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    x32 = {k: (t.detach().float().requires_grad_() if t.is_floating_point() else t) for k, t in x.items()}
    ref = {k: t.detach() for k, t in grad_step(ba.reference_impl, ba.LEAVES, x32, grad_out.float()).items()}
    group = Group("attention", "conditional attention", str(shape), str(device.type), str(dtype)[6:],
                  op_entries(ba.implementations(shape, x, device), x, ref, grad_out, dtype),
                  published="published", peer="flash", targets=TARGETS)
    time_interleaved(group.entries, device, rounds)
    return group


def test_attention(bench, shape, impl, direction):
    if bench.device.type != "cuda":
        pytest.skip(CPU_REASON)
    rounds = 10 if bench.quick else 20
    bench.report(("attention", str(shape)), lambda: build_group(shape, torch.bfloat16, bench.device, rounds),
                 impl, direction)
