"""The cuda backend (camtl._C through camtl.backends.cuda_ext) on a GPU: the conditional layer norm and FiLM
against the torch backend (and the triton one at real shapes): outputs and every gradient, dtypes, odd D,
strided rows, mixed and absent tasks, determinism, opcheck, torch.compile; the per-task sum against its
fixed-order fp64 definition, bit for bit."""

import pytest
import torch

import camtl
from camtl.backends import cuda_ext
from camtl.ops.film import _cuda_film as cuda_film
from camtl.ops.layer_norm import _cuda_conditional_layer_norm as cuda_layer_norm
from camtl_test_helpers import assert_close, graph_has, poisoned_empty, run_with_grads

try:
    import camtl._C as ext
except ImportError:
    ext = None


@pytest.fixture(autouse=True)
def _extension_built():
    if ext is None:
        pytest.fail("camtl._C is not built on this machine (no nvcc when camtl was installed?): the cuda backend "
                    "cannot be checked")


TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _gpu_inputs(Bn, Ln, Dn, Gn, dtype, residual, seed, row_stride=None):
    """Fresh CUDA inputs; with row_stride, every 2-D+ operand's rows sit in a wider buffer (row stride != D)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()
        if row_stride is not None and t.dim() > 1:
            wide = torch.zeros(*shape[:-1], row_stride, dtype=dtype, device="cuda")
            wide[..., :shape[-1]] = t
            t = wide[..., :shape[-1]]
        return t
    args = dict(x=rand(Bn, Ln, Dn, scale=2.0), weight=rand(Dn), bias=rand(Dn), gamma=rand(Gn, Dn, scale=0.5),
                beta=rand(Gn, Dn, scale=0.5), residual=rand(Bn, Ln, Dn) if residual else None)
    return args, rand(Bn, Ln, Dn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Dn,row_stride", [(13, None), (768, None), (769, None), (8192, None), (13, 16)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cuda_ext_matches_torch(dtype, Dn, row_stride, residual):
    from camtl.backends import torch_ref

    args, dy = _gpu_inputs(4, 5, Dn, 5, dtype, residual, seed=Dn, row_stride=row_stride)
    index = torch.tensor([3, 0, 3, 1], device="cuda")  # tasks 2 and 4 absent
    leaves = {k: v.detach().requires_grad_() for k, v in args.items() if v is not None}  # strides kept
    y = cuda_layer_norm(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                                        leaves["beta"], index, 1e-5, leaves.get("residual"))
    y.backward(dy)
    ref = {k: v.detach().double().requires_grad_() for k, v in args.items() if v is not None}
    y_ref = torch_ref.conditional_layer_norm(ref["x"], ref["weight"], ref["bias"], ref["gamma"], ref["beta"],
                                             index, 1e-5, ref.get("residual"))
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    torch.testing.assert_close(leaves["x"].grad.double(), ref["x"].grad, **TOL[dtype])
    for name in ("weight", "bias", "gamma", "beta") + (("residual",) if residual else ()):
        # the parameter gradients are rounded to the dtype once, after fp32 sums
        torch.testing.assert_close(leaves[name].grad.double(), ref[name].grad,
                                   **(TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)))
    assert leaves["gamma"].grad[[2, 4]].eq(0).all()


def test_cuda_ext_is_bitwise_deterministic():
    args, dy = _gpu_inputs(8, 64, 769, 3, torch.bfloat16, True, seed=1)
    index = torch.tensor([2, 0, 2, 1, 1, 0, 2, 2], device="cuda")
    outs = []
    for _ in range(2):
        leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
        y = cuda_layer_norm(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                                            leaves["beta"], index, 1e-5, leaves["residual"])
        y.backward(dy)
        outs.append([y] + [leaves[k].grad for k in sorted(leaves)])
    for first, second in zip(*outs):
        assert torch.equal(first.view(torch.int16), second.view(torch.int16))


def test_cuda_ext_opcheck_and_compile():
    args, _ = _gpu_inputs(2, 3, 768, 3, torch.float32, True, seed=2)
    index = torch.tensor([2, 0], device="cuda")
    leaves = {k: v.detach().requires_grad_() for k, v in args.items()}
    torch.library.opcheck(torch.ops.camtl.cuda_conditional_layer_norm_fwd,
                          (leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"], leaves["beta"], index,
                           leaves["residual"], 1e-5))
    compiled = torch.compile(cuda_layer_norm, fullgraph=True)
    y = compiled(args["x"], args["weight"], args["bias"], args["gamma"], args["beta"], index, 1e-5, args["residual"])
    torch.testing.assert_close(y, cuda_layer_norm(args["x"], args["weight"], args["bias"],
                                                                  args["gamma"], args["beta"], index, 1e-5,
                                                                  args["residual"]))


# ---- FiLM ------------------------------------------------------------------------------------------------------------

def _film_tensors(B, L, D, G, dtype, shared, seed, row_stride=None):
    """x, gamma, beta and dy on the GPU; with row_stride, x's and the tables' rows sit in a wider buffer."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype).cuda()
        if row_stride is None:
            return t
        wide = torch.randn(*shape[:-1], row_stride, generator=gen).to(dtype).cuda()
        wide[..., :shape[-1]] = t
        return wide[..., :shape[-1]]
    x = rand(*((L, D) if shared else (B, L, D)), scale=2.0)
    return [x, rand(G, D, scale=0.5), rand(G, D, scale=0.5)], rand(B, L, D)


def _film(index):
    return lambda x, g, b: camtl.ops.film(x, g, b, index)


def _run_keeping_strides(backend, fn, tensors, grad):
    """run_with_grads without its clone (which would make strided rows contiguous)."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    with camtl.use_backend(backend):
        out = fn(*leaves)
    out.backward(grad)
    return out, [leaf.grad for leaf in leaves]


def _check_film(tensors, dy, index, dtype, against=("torch",)):
    """The cuda backend against each backend in ``against`` (torch in float64 on the same rounded inputs)."""
    with poisoned_empty():
        out, grads = _run_keeping_strides("cuda", _film(index), tensors, dy)
    assert graph_has(out, "camtl::cuda_film_fwd")
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    for backend in against:
        ref_in = [t.double() for t in tensors] if backend == "torch" else tensors
        exp, exp_grads = run_with_grads(backend, _film(index), ref_in, dy.double() if backend == "torch" else dy)
        # Σ|terms| of every element: the scale of its rounding error
        abs_out, abs_grads = run_with_grads("torch", _film(index), [t.double().abs() for t in tensors],
                                            dy.double().abs())
        assert_close(out.detach(), exp.detach(), dtype, f"output vs {backend}", abs_out.detach())
        for name, g, e, m in zip(("x", "gamma", "beta"), grads, exp_grads, abs_grads):
            assert_close(g, e, dtype, f"grad of {name} vs {backend}", m)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D,row_stride", [(13, None), (37, None), (768, None), (769, None), (8192, None),
                                          (13, 16), (770, 776)])
@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_cuda_film_matches_torch(dtype, D, row_stride, shared):
    tensors, dy = _film_tensors(4, 9, D, 5, dtype, shared, seed=D, row_stride=row_stride)
    index = torch.tensor([3, 0, 3, 1], device="cuda")  # tasks 2 and 4 absent
    _, (_, dgamma, dbeta) = _check_film(tensors, dy, index, dtype)
    assert dgamma[[2, 4]].eq(0).all() and dbeta[[2, 4]].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_cuda_film_matches_torch_and_triton_at_real_shapes(dtype, shared):
    B, L, D, G = 32, 128, 768, 8
    tensors, dy = _film_tensors(B, L, D, G, dtype, shared, seed=3)
    index = torch.randint(0, G - 1, (B,), device="cuda")  # task G - 1 absent
    index[: G - 1] = torch.arange(G - 1, device="cuda")
    _, (_, dgamma, _) = _check_film(tensors, dy, index.int(), dtype, against=("torch", "triton"))  # int32 ids too
    assert dgamma[G - 1].eq(0).all() and dgamma[: G - 1].ne(0).any(1).all()


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_cuda_film_is_bitwise_deterministic(shared):
    tensors, dy = _film_tensors(16, 200, 769, 3, torch.bfloat16, shared, seed=4)
    index = torch.randint(0, 3, (16,), device="cuda")
    first = run_with_grads("cuda", _film(index), tensors, dy)
    second = run_with_grads("cuda", _film(index), tensors, dy)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_cuda_film_empty_and_refused_inputs():
    x, gamma = torch.randn(5, 8, device="cuda"), torch.randn(2, 8, device="cuda")
    empty = torch.empty(0, dtype=torch.int64, device="cuda")
    dx, dscale, _ = cuda_ext.film_backward(torch.empty(0, 5, 8, device="cuda"), x, gamma, empty)
    assert dx.eq(0).all() and dscale.shape == (0, 2, 8)
    with pytest.raises(IndexError, match=r"camtl.ops.film \(cuda backend\): argument 'index' holds 2"):
        cuda_ext.film_forward(x, gamma, gamma, torch.tensor([0, 2], device="cuda"))


def test_cuda_film_opcheck_and_compile():
    tensors, _ = _film_tensors(2, 3, 768, 3, torch.float32, False, seed=5)
    index = torch.tensor([2, 0], device="cuda")
    leaves = [t.detach().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.camtl.cuda_film_fwd, (*leaves, index))
    shared, _ = _film_tensors(2, 3, 768, 3, torch.float32, True, seed=6)
    torch.library.opcheck(torch.ops.camtl.cuda_film_fwd, (*[t.detach().requires_grad_() for t in shared], index))
    compiled = torch.compile(cuda_film, fullgraph=True)
    torch.testing.assert_close(compiled(*tensors, index), cuda_film(*tensors, index))


# ---- the per-task sum --------------------------------------------------------------------------------------------

def test_cuda_task_sum_is_the_fixed_order_fp64_sum():
    gen = torch.Generator().manual_seed(7)
    partials = (torch.randn(24, 9, 300, generator=gen) * torch.logspace(-6, 6, 300)).cuda()
    index = torch.randint(0, 5, (24,), generator=gen).cuda()
    index[index == 3] = 4  # task 3 absent
    ordered = torch.zeros(6, 300, dtype=torch.float64, device="cuda")
    for b, task in enumerate(index.tolist()):
        for p in range(9):
            ordered[task] += partials[b, p].double()
    sums = cuda_ext.per_task_sum(partials, index, 6)
    assert torch.equal(sums, ordered.float()) and sums[[3, 5]].eq(0).all()
    from camtl.ops._reduce import per_task_sum

    torch.testing.assert_close(sums, per_task_sum(partials, index, 6), rtol=1e-6, atol=0)
    again = cuda_ext.per_task_sums([partials, partials], index, 6)
    assert all(torch.equal(a.view(torch.int32), sums.view(torch.int32)) for a in again)


SANITIZED_CASE = """
import torch
import camtl
from camtl import ops
torch.manual_seed(0)
B, L, D, G = 3, 5, 129, 4  # odd D: the scalar tail; a task absent
x = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
res = torch.randn_like(x, requires_grad=True)
w, b = (torch.randn(D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
gamma, beta = (torch.randn(G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
index = torch.tensor([0, 2, 0], device="cuda")
with camtl.use_backend("cuda"):
    y = ops.conditional_layer_norm(x, w, b, gamma, beta, index, 1e-5, res)
    z = ops.film(x, gamma, beta, index)
    (y.float().square().sum() + z.float().sum()).backward()
torch.cuda.synchronize()
print("case ran")
"""


def test_compute_sanitizer_finds_no_error_in_a_small_case(tmp_path):
    """compute-sanitizer (memcheck) over the cuda backend's layer norm and FiLM, forward and backward, and the
    per-task sums, at an odd D: no out-of-bounds or misaligned access, no CUDA API error."""
    import shutil
    import subprocess
    import sys

    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not on this machine's PATH (it comes with the CUDA toolkit)")
    script = tmp_path / "case.py"
    script.write_text(SANITIZED_CASE)
    done = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "case ran" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]
