"""The Triton FiLM (camtl.kernels.film) against the torch backend.

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

import camtl
from camtl import ops
from camtl.kernels.film import film_backward
from camtl.ops.film import _film_fwd
from conftest import assert_close, graph_has, poisoned_empty, run_with_grads, triton_vs_torch

NAMES = ("x", "gamma", "beta")
ROOT = Path(__file__).resolve().parents[1]


def make(x_shape, G, device):
    D = x_shape[-1]
    return [torch.randn(*x_shape, device=device), torch.randn(G, D, device=device), torch.randn(G, D, device=device)]


def film(index):
    return lambda x, g, b: ops.film(x, g, b, index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [37, 100])
@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_matches_torch_backend(shared, D, dtype, device):
    B, L = 4, 7
    index = torch.tensor([2, 0, 2, 1], device=device)  # mixed tasks, out of order
    triton_vs_torch(film(index), make((L, D) if shared else (B, L, D), 3, device), dtype, NAMES,
                    multilinear=True)


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_long_examples_reduce_over_several_chunks(shared, device):
    B, L, D = 2, 45, 9
    x, g, b = make((L, D) if shared else (B, L, D), 2, device)
    index = torch.tensor([1, 1], device=device, dtype=torch.int32)  # int32 ids are taken too
    _, dscale, _ = film_backward(torch.randn(B, L, D, device=device), x, g, index)
    assert dscale.shape[1] > 1, "the shape should exercise the two-stage reduction"
    triton_vs_torch(film(index), [x, g, b], torch.float32, NAMES, multilinear=True)


@pytest.mark.parametrize("x_shape", [(3, 5, 12), (5, 12)], ids=["x [B, L, D]", "x [L, D] shared"])
def test_without_index_each_example_is_its_own_task(x_shape, device):
    triton_vs_torch(film(None), make(x_shape, 3, device), torch.float32, NAMES, multilinear=True)


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_absent_tasks_get_exactly_zero_grads(shared, device):
    index = torch.tensor([0, 2, 2, 0], device=device)  # tasks 1 and 3 absent
    _, (_, dgamma, dbeta) = triton_vs_torch(film(index), make((6, 20) if shared else (4, 6, 20), 4, device),
                                            torch.float32, NAMES, multilinear=True)
    for t in (1, 3):
        assert (dgamma[t] == 0).all() and (dbeta[t] == 0).all()
    for t in (0, 2):
        assert (dgamma[t] != 0).any() and (dbeta[t] != 0).any()


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_backward_is_deterministic_and_ignores_uninitialized_memory(shared, device):
    B, L, D = 3, 11, 70
    index = torch.tensor([1, 0, 1], device=device)  # task 2 absent
    tensors = make((L, D) if shared else (B, L, D), 3, device)
    grad = torch.randn(B, L, D, device=device)
    out, grads = run_with_grads("triton", film(index), tensors, grad)
    again, grads_again = run_with_grads("triton", film(index), tensors, grad)
    with poisoned_empty():
        poisoned, grads_poisoned = run_with_grads("triton", film(index), tensors, grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out, again) and torch.equal(out, poisoned)
    for g, g2, g3 in zip(grads, grads_again, grads_poisoned):
        assert torch.equal(g, g2) and torch.equal(g, g3)


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_opcheck(shared, device):
    tensors = [t.requires_grad_() for t in make((5, 12) if shared else (2, 5, 12), 3, device)]
    torch.library.opcheck(_film_fwd, (*tensors, torch.tensor([2, 0], device=device)))


def test_float64_is_reference_only(device):
    x, g, b = (t.double() for t in make((2, 3, 8), 2, device))
    with camtl.use_backend("triton"), pytest.raises(camtl.BackendUnavailableError, match="float64"):
        ops.film(x, g, b, torch.tensor([0, 1], device=device))


@pytest.mark.parametrize("x_shape", [(3, 6, 24), (6, 24), (24,)], ids=["[B, L, D]", "[L, D]", "[D]"])
def test_module_uses_the_kernel(x_shape, device):
    """The FiLM module (per-example gamma, beta from x_cond): the triton backend matches torch, params included."""
    module = camtl.nn.FiLM(16, 24).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x_cond, x = torch.randn(3, 16, device=device), torch.randn(*x_shape, device=device)
    grad = torch.randn(3, x_shape[-2] if len(x_shape) > 1 else 1, 24, device=device)
    results = {}
    for backend in ("triton", "torch"):
        module.zero_grad()
        out, (dcond, dx) = run_with_grads(backend, module, (x_cond, x), grad)
        assert graph_has(out, "camtl::film_fwd") == (backend == "triton")
        results[backend] = [out.detach(), dcond, dx] + [p.grad.clone() for p in module.parameters()]
    for a, e in zip(results["triton"], results["torch"]):
        assert_close(a, e, torch.float32)


def test_backward_compiles_without_spills(tmp_path):
    """The per-example backward as a GPU launches it, for sm_90a fp16 (on 4 warps ptxas spilled 8 B, reloaded in the row loop)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--out", str(tmp_path),
                             "--arch", "sm_90a", "--dtype", "fp16", "--hidden", "768", "--kernel", "film_bwd",
                             "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel-report.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["spill_bytes"] == 0, rows
