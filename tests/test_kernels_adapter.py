"""The Triton FiLM + down-projection GEMM (camtl.kernels.adapter) against the torch backend.

On the CPU these run under TRITON_INTERPRET=1 (set by conftest.py): small shapes.
The torch backend itself is checked against a naive reference in test_ops_film.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import camtl
from camtl import ops
from camtl.ops.adapter import _film_linear_fwd
from conftest import assert_close, bert_config, graph_has, poisoned_empty, run_with_grads, triton_vs_torch

NAMES = ("x", "gamma", "beta", "weight", "bias")
ROOT = Path(__file__).resolve().parents[1]


def compile_report(out, kernels, arch, dtypes):
    """Rows of scripts/kernel_report.py for these kernels at D 768: the launch functions' GPU configurations, compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--out", str(out), "--arch",
                             arch, "--dtype", *dtypes, "--hidden", "768", "--kernel", *kernels, "--no-progress"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(out) / "kernel-report.json").read_text())["rows"]


def make(B, L, D, G, device, bias=True):
    """x, gamma, beta, weight [D // 3, D] (scaled like nn.Linear's) and optionally bias."""
    N = D // 3
    tensors = [torch.randn(B, L, D, device=device), 0.5 * torch.randn(G, D, device=device),
               0.5 * torch.randn(G, D, device=device), torch.randn(N, D, device=device) / D ** 0.5]
    if bias:
        tensors.append(torch.randn(N, device=device))
    return tensors


def film_linear(index):
    return lambda x, g, b, w, bias=None: ops.film_linear(x, g, b, index, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [37, 100])
def test_matches_torch_backend(D, dtype, device):
    index = torch.tensor([2, 0, 2, 1], device=device)  # mixed tasks, out of order
    # M = 36: a partial row tile
    triton_vs_torch(film_linear(index), make(4, 9, D, 3, device), dtype, NAMES, multilinear=True)


def test_computed_accumulator_zeros_give_the_same_bits(device, monkeypatch):
    """On sm_90 the GEMM's accumulator starts from computed zeros (WGMMA: accumulator_zeros), elsewhere from
    tl.zeros: the same output, bit for bit."""
    import camtl.kernels.adapter as adapter_kernels

    x, g, b, w, bias = make(3, 7, 40, 2, device)
    index = torch.tensor([1, 0, 1], device=device)
    from_tl_zeros = adapter_kernels.film_linear_forward(x, g, b, index, w, bias)
    config = adapter_kernels._config
    monkeypatch.setattr(adapter_kernels, "_config", lambda *args: dict(config(*args), WGMMA=True))
    computed = adapter_kernels.film_linear_forward(x, g, b, index, w, bias)
    assert torch.isfinite(from_tl_zeros).all() and torch.equal(from_tl_zeros, computed)
    assert "WGMMA" not in config(torch.float32)  # the interpreter's tiles: the kernel's default, False
    monkeypatch.delenv("TRITON_INTERPRET")
    assert config(torch.bfloat16, (9, 0))["WGMMA"] and not config(torch.bfloat16, (8, 0))["WGMMA"]


def test_without_bias_and_without_index(device):
    triton_vs_torch(film_linear(None), make(3, 5, 48, 3, device, bias=False), torch.float32, NAMES,
                    multilinear=True)


def test_strided_views(device):
    x, g, b, w, bias = (torch.randn(2, 30, 5, device=device).transpose(1, 2),  # [B, L, D] = [2, 5, 30]
                        torch.randn(30, 2, device=device).T, torch.randn(30, 2, device=device).T,
                        torch.randn(30, 10, device=device).T / 30 ** 0.5, torch.randn(10, device=device))
    assert not (x.is_contiguous() or g.is_contiguous() or w.is_contiguous())
    triton_vs_torch(film_linear(torch.tensor([1, 0], device=device)), [x, g, b, w, bias], torch.float32, NAMES,
                    multilinear=True)


def test_absent_tasks_get_exactly_zero_gamma_and_beta_grads(device):
    index = torch.tensor([0, 2, 2, 0], device=device)  # tasks 1 and 3 absent
    _, grads = triton_vs_torch(film_linear(index), make(4, 5, 30, 4, device), torch.float32, NAMES,
                               multilinear=True)
    dgamma, dbeta = grads[1], grads[2]
    for t in (1, 3):
        assert (dgamma[t] == 0).all() and (dbeta[t] == 0).all()
    for t in (0, 2):
        assert (dgamma[t] != 0).any() and (dbeta[t] != 0).any()


def test_backward_is_deterministic_and_ignores_uninitialized_memory(device):
    B, L, D = 3, 7, 50
    index = torch.tensor([1, 0, 1], device=device)  # task 2 absent
    tensors = make(B, L, D, 3, device)
    grad = torch.randn(B, L, D // 3, device=device)
    out, grads = run_with_grads("triton", film_linear(index), tensors, grad)
    again, grads_again = run_with_grads("triton", film_linear(index), tensors, grad)
    with poisoned_empty():
        poisoned, grads_poisoned = run_with_grads("triton", film_linear(index), tensors, grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out, again) and torch.equal(out, poisoned)
    for g, g2, g3 in zip(grads, grads_again, grads_poisoned):
        assert torch.equal(g, g2) and torch.equal(g, g3)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def test_opcheck(bias, device):
    x, g, b, w, *rest = [t.requires_grad_() for t in make(2, 5, 24, 3, device, bias)]
    args = (x, g, b, torch.tensor([2, 0], device=device), w, rest[0] if bias else None)
    torch.library.opcheck(_film_linear_fwd, args)


def test_float64_is_reference_only(device):
    x, g, b, w, bias = (t.double() for t in make(2, 3, 9, 2, device))
    with camtl.use_backend("triton"), pytest.raises(camtl.BackendUnavailableError, match="float64"):
        ops.film_linear(x, g, b, torch.tensor([0, 1], device=device), w, bias)


def test_module_uses_the_kernel(device):
    """ConditionalBottleNeck: the triton backend matches torch, parameters included."""
    D = 48
    module = camtl.nn.ConditionalBottleNeck(bert_config(hidden_size=D)).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x_cond, h = torch.randn(3, D, device=device), torch.randn(3, 6, D, device=device)
    grad = torch.randn(3, 6, D, device=device)
    results = {}
    for backend in ("triton", "torch"):
        module.zero_grad()
        out, (dcond, dh) = run_with_grads(backend, module, (x_cond, h), grad)
        assert graph_has(out, "camtl::film_linear_fwd") == (backend == "triton")
        results[backend] = [out.detach(), dcond, dh] + [p.grad.clone() for p in module.parameters()]
    for a, e in zip(results["triton"], results["torch"]):
        assert_close(a, e, torch.float32)


def test_torch_compile_fullgraph(device):
    """The published adapter sublayer, CLN(bottleneck(h) + attention_out), compiles whole with all three kernels."""
    D, B, L = 48, 3, 6
    bottleneck = camtl.nn.ConditionalBottleNeck(bert_config(hidden_size=D)).to(device)
    norm = camtl.nn.ConditionalLayerNorm(D, D).to(device)
    z, task_id = torch.randn(B, D, device=device), torch.tensor([1, 0, 1], device=device)
    h = torch.randn(B, L, D, device=device, requires_grad=True)
    attention_out = torch.randn(B, L, D, device=device, requires_grad=True)

    def adapter(h, attention_out):
        return norm(bottleneck(z, h), z, task_id, attention_out)

    backend = CompileCounterWithBackend("aot_eager")  # keeps the graphs it compiles
    with camtl.use_backend("triton"):
        eager = adapter(h, attention_out)
        out = torch.compile(adapter, fullgraph=True, backend=backend)(h, attention_out)
    code = backend.graphs[0].code
    assert "camtl.film_linear_fwd" in code and "camtl.conditional_layer_norm_fwd" in code
    assert_close(out, eager, torch.float32)
    grad = torch.randn_like(out)
    for g_out, g_eager in zip(torch.autograd.grad(out, (h, attention_out), grad),
                              torch.autograd.grad(eager, (h, attention_out), grad)):
        assert_close(g_out, g_eager, torch.float32)


def test_float32_dots_use_tf32_on_a_gpu_and_exact_products_under_the_interpreter(monkeypatch):
    from camtl.kernels._common import dot_flags

    assert dot_flags(torch.float32) == (False, "ieee")  # the interpreter: the tests compare at fp32 tolerances
    assert dot_flags(torch.bfloat16) == (True, "ieee")  # its bf16 dot is wrong: upcast
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dot_flags(torch.float32) == (False, "tf32")  # never the FMA path ("ieee") on a GPU
    assert dot_flags(torch.bfloat16) == (False, None) and dot_flags(torch.float16) == (False, None)


def test_a_float32_cuda_launch_needs_torch_to_allow_tf32(monkeypatch):
    """The launch's own guard, for callers that skip the dispatcher (no GPU needed: only the device type is read)."""
    from camtl import backends
    from camtl.kernels._common import require_tf32

    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "tf32_matmul_allowed", lambda: False)
    with pytest.raises(camtl.BackendUnavailableError, match=r"film_linear.*TF32.*fp32_precision = 'tf32'"):
        require_tf32(torch.float32, cuda, "film_linear")
    require_tf32(torch.float16, cuda, "film_linear")  # 16-bit: fine
    require_tf32(torch.float32, torch.device("cpu"), "film_linear")  # the interpreter: exact products
    monkeypatch.setattr(backends, "tf32_matmul_allowed", lambda: True)
    require_tf32(torch.float32, cuda, "film_linear")


def test_shipped_configurations_compile_without_spills(tmp_path):
    """The configurations a GPU launches, compiled for sm_80 (where 128x64 tiles on 4 warps spilled 88-140 B)."""
    rows = compile_report(tmp_path, ["adapter_fwd"], arch="sm_80", dtypes=["fp16", "bf16"])
    assert len(rows) == 2
    for row in rows:
        assert row["spill_bytes"] == 0 and row["tensor_core_op"] == "mma.sync", row


def test_sm90a_configurations_keep_their_wgmma_pipelined(tmp_path):
    """At D 768 ptxas serialized the GEMM's wgmma (C7515) while its accumulator started from tl.zeros."""
    rows = compile_report(tmp_path, ["adapter_fwd"], arch="sm_90a", dtypes=["fp16", "bf16"])
    assert len(rows) == 2
    for row in rows:
        assert row["spill_bytes"] == 0 and row["tensor_core_op"] == "wgmma" and row["wgmma_serialized"] is None, row
