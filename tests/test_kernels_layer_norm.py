"""The Triton conditional layer norm (camtl.kernels.layer_norm) against the torch backend.

On the CPU these run under TRITON_INTERPRET=1 (set by conftest.py): small shapes.
The torch backend itself is checked against a naive reference in test_ops_layer_norm.py.
"""

import pytest
import torch

import camtl
from camtl import ops
from camtl.kernels.layer_norm import layer_norm_backward, layer_norm_forward
from camtl.ops.layer_norm import _cln_fwd
from conftest import (assert_close, graph_has, poisoned_empty, run_with_grads, shuffled_program_order,
                      triton_vs_torch)

NAMES = ("x", "weight", "bias", "gamma", "beta", "residual")


def make(x_shape, G, device, residual=True):
    """x (off-centre, scaled), weight, bias, gamma, beta and optionally residual."""
    D = x_shape[-1]
    tensors = [torch.randn(*x_shape, device=device) * 3 + 1, 1 + 0.1 * torch.randn(D, device=device),
               torch.randn(D, device=device), 0.5 * torch.randn(G, D, device=device),
               0.5 * torch.randn(G, D, device=device)]
    if residual:
        tensors.append(torch.randn(*x_shape, device=device))
    return tensors


def cln(index, eps=1e-5):
    """The op as a function of its tensors (residual last, optional)."""
    return lambda x, w, b, g, be, res=None: ops.conditional_layer_norm(x, w, b, g, be, index, eps, res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [37, 100, 256])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused residual"])
def test_matches_torch_backend(residual, D, dtype, device):
    index = torch.tensor([2, 0, 2, 1], device=device)  # mixed tasks, out of order
    tensors = make((4, 6, D), 3, device, residual)
    triton_vs_torch(cln(index), tensors, dtype, NAMES)


@pytest.mark.parametrize("x_shape", [(5, 24), (2, 3, 2, 16)], ids=["[B, D]", "[B, *, D]"])
def test_ranks(x_shape, device):
    index = torch.tensor([1, 0, 1, 1, 0][: x_shape[0]], device=device)
    triton_vs_torch(cln(index), make(x_shape, 2, device), torch.float32, NAMES)


def test_strided_views(device):
    _, w, b, g, be, _ = make((3, 7, 20), 2, device)
    x, res = (torch.randn(3, 20, 7, device=device).transpose(1, 2) for _ in range(2))  # [B, L, D] = [3, 7, 20]
    views = [x, w, b, g.T.contiguous().T, be, res]  # gamma column-major
    assert not (x.is_contiguous() or views[3].is_contiguous())
    triton_vs_torch(cln(torch.tensor([1, 0, 1], device=device)), views, torch.float32, NAMES)


def test_float16(device):
    index = torch.tensor([0, 1, 0], device=device)
    triton_vs_torch(cln(index, eps=1e-3), make((3, 5, 48), 2, device), torch.float16, NAMES)


def test_long_examples_reduce_over_several_chunks(device):
    B, L, D = 2, 41, 20
    x, w, b, g, be, res = make((B, L, D), 2, device)
    index = torch.tensor([1, 0], device=device)
    y, mean, rstd = layer_norm_forward(x, w, b, g, be, index, res, 1e-5)
    _, dscale, _ = layer_norm_backward(torch.randn_like(y), x, w, g, be, index, res, mean, rstd)
    assert dscale.shape[1] > 1, "the shape should exercise the two-stage reduction"
    triton_vs_torch(cln(index), [x, w, b, g, be, res], torch.float32, NAMES)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused residual"])
def test_rows_whose_variance_is_near_eps(residual, device):
    """Rows of variance ~1e-4 with eps = 1e-3: rstd = 1/sqrt(var + eps) differs from 1/sqrt(var) or
    1/(sqrt(var) + eps) by a factor of 3, so eps must be in the right place. Every other row is wide."""
    B, L, D = 3, 4, 40
    x, w, b, g, be, res = make((B, L, D), 2, device)
    x[:, ::2] = 0.1 + 1e-2 * torch.randn(B, (L + 1) // 2, D, device=device)
    res[:, ::2] = 0.01 * torch.randn(B, (L + 1) // 2, D, device=device)
    tensors = [x, w, b, g, be, res] if residual else [x, w, b, g, be]
    h = x + res if residual else x
    assert (h[:, ::2].var(-1, unbiased=False) < 3e-4).all() and (h[:, 1::2].var(-1) > 1).all()
    triton_vs_torch(cln(torch.tensor([1, 0, 1], device=device), eps=1e-3), tensors, torch.float32, NAMES)


def test_without_index_each_example_is_its_own_task(device):
    triton_vs_torch(cln(None), make((3, 4, 24), 3, device), torch.float32, NAMES)


def test_absent_tasks_get_exactly_zero_gamma_and_beta_grads(device):
    index = torch.tensor([0, 2, 2, 0], device=device)  # tasks 1 and 3 absent
    _, grads = triton_vs_torch(cln(index), make((4, 5, 40), 4, device), torch.float32, NAMES)
    dgamma, dbeta = grads[3], grads[4]
    for t in (1, 3):
        assert (dgamma[t] == 0).all() and (dbeta[t] == 0).all()
    for t in (0, 2):
        assert (dgamma[t] != 0).any() and (dbeta[t] != 0).any()


def test_backward_does_not_depend_on_program_order(device):
    """Bitwise the same output and gradients whatever order the programs run in (the row sums are a two-stage
    reduction, no atomics). The interpreter runs programs in grid order, so only a shuffled order can show it."""
    B, L, D = 2, 41, 72
    index = torch.tensor([1, 1], device=device)  # one task: its gamma grad sums every chunk of both examples
    tensors = x, w, b, g, be, res = make((B, L, D), 2, device)
    grad = torch.randn(B, L, D, device=device)
    _, mean, rstd = layer_norm_forward(x, w, b, g, be, index, res, 1e-5)
    _, dscale, _ = layer_norm_backward(grad, x, w, g, be, index, res, mean, rstd)
    assert dscale.shape[1] > 2, "each example's rows should be summed over several chunks"
    out, grads = run_with_grads("triton", cln(index), tensors, grad)
    for seed in (1, 2):
        with shuffled_program_order(seed):
            shuffled_out, shuffled_grads = run_with_grads("triton", cln(index), tensors, grad)
        assert torch.equal(out, shuffled_out)
        for name, got, want in zip(NAMES, shuffled_grads, grads):
            assert torch.equal(got, want), f"grad of {name} depends on the program order"


def test_outputs_do_not_depend_on_uninitialized_memory(device):
    index = torch.tensor([1, 0, 1], device=device)
    tensors = make((3, 9, 37), 3, device)  # task 2 absent: its rows must come out as zeros too
    grad = torch.randn(3, 9, 37, device=device)
    with poisoned_empty():
        out, grads = run_with_grads("triton", cln(index), tensors, grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    clean_out, clean_grads = run_with_grads("triton", cln(index), tensors, grad)
    assert torch.equal(out, clean_out)
    for a, b in zip(grads, clean_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused residual"])
def test_opcheck(residual, device):
    tensors = [t.requires_grad_() for t in make((2, 3, 20), 3, device, residual)]
    res = tensors[5] if residual else None
    args = (*tensors[:5], torch.tensor([2, 0], device=device), res, 1e-5)
    torch.library.opcheck(_cln_fwd, args)


@pytest.mark.parametrize("dtype,D,words", [(torch.float64, 8, "float64"), (torch.float32, 16385, "up to 16384")])
def test_inputs_the_kernel_does_not_take_are_reference_only(dtype, D, words, device):
    tensors = [t.to(dtype) for t in make((2, 1, D), 2, device)]
    with camtl.use_backend("triton"), pytest.raises(camtl.BackendUnavailableError, match=words):
        cln(torch.tensor([0, 1], device=device))(*tensors)
    with camtl.use_backend("auto"):  # auto takes the reference
        assert cln(torch.tensor([0, 1], device=device))(*tensors).dtype == dtype


def test_module_uses_the_kernel(device):
    """ConditionalLayerNorm (mixed tasks, fused residual): the triton backend matches torch, params included."""
    B, L, D, C = 4, 5, 48, 16
    module = camtl.nn.ConditionalLayerNorm(D, C).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x, res = torch.randn(B, L, D, device=device), torch.randn(B, L, D, device=device)
    cond, task_id = torch.randn(B, C, device=device), torch.tensor([3, 1, 3, 1], device=device)
    grad = torch.randn(B, L, D, device=device)
    results = {}
    for backend in ("triton", "torch"):
        module.zero_grad()
        out, (dx, dres) = run_with_grads(backend, lambda a, r: module(a, cond, task_id, r), (x, res), grad)
        assert graph_has(out, "camtl::conditional_layer_norm_fwd") == (backend == "triton")
        results[backend] = [out.detach(), dx, dres] + [p.grad.clone() for p in module.parameters()]
    for a, e in zip(results["triton"], results["torch"]):
        assert_close(a, e, torch.float32)


def test_launches_on_meta_tensors_can_stand_for_a_gpu():
    """scripts/kernel_report.py records launches on meta tensors: inside simulated_gpu they size grids as that GPU."""
    from camtl.kernels import _common

    meta = torch.device("meta")
    assert _common.target_programs(meta) == 8 and _common.gpu_capability(meta) is None
    with _common.simulated_gpu((9, 0), 132):
        assert _common.target_programs(meta) == 264 and _common.gpu_capability(meta) == (9, 0)
        assert _common.gpu_capability(torch.device("cpu")) is None  # real CPU tensors are not simulated
        # 8 examples of 128 rows on a 132-SM GPU: a chunk per 4-row tile (33 wanted, 32 tiles), not one of 128 rows
        assert _common.rows_per_chunk(128, 8, 4, meta) == 4
    assert _common.target_programs(meta) == 8
    with pytest.raises(ValueError, match="sm_count"):
        with _common.simulated_gpu((8, 0), 0):
            pass
