"""The CUDA kernels' arithmetic, run on the CPU: csrc/host_harness.cpp runs the programs of csrc/layer_norm.h,
csrc/film.h and csrc/task_reduce.h over the whole grid (HostBlock stands in for the CUDA block, with the device's
sum order), compared with the torch backend. Built once per source hash with g++ (no GPU or CUDA toolkit
needed)."""

import contextlib
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from camtl.backends import torch_ref
from camtl.ops._reduce import per_task_sum

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("host_harness.cpp", "host_block.h", "block.h", "layer_norm.h", "film.h", "task_reduce.h", "camtl_types.h")
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VEC16 = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
# Tolerances against a float64 reference computed from the same (rounded) inputs: y and dx are rounded to the dtype.
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# The fp32 parameter gradients sum over rows: their error grows with the row count, not with the dtype.
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)

I64, F32, INT, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


@pytest.fixture(scope="session")
def harness():
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build csrc/host_harness.cpp")
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    folder = Path(tempfile.gettempdir()) / f"camtl-csrc-host-{digest.hexdigest()[:16]}"
    library = folder / "harness.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"harness.{os.getpid()}.so"  # then renamed: a concurrent run never loads half a file
        built = subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing",
                                "-shared", "-fPIC", str(CSRC / "host_harness.cpp"), "-o", str(partial)],
                               capture_output=True, text=True)
        assert built.returncode == 0, f"{compiler} failed on csrc/host_harness.cpp:\n{built.stderr}"
        os.replace(partial, library)
    lib = ctypes.CDLL(str(library))
    lib.camtl_host_cln_forward.argtypes = [INT, PTR, I64, PTR, I64, PTR, PTR, PTR, I64, PTR, I64, PTR, PTR, I64,
                                           PTR, PTR, I64, I64, INT, F32, ctypes.POINTER(INT)]
    lib.camtl_host_cln_backward.argtypes = [INT, PTR, I64, PTR, I64, PTR, I64, PTR, PTR, I64, PTR, I64, PTR, PTR,
                                            PTR, PTR, I64, PTR, PTR, I64, I64, I64, INT, INT, ctypes.POINTER(INT)]
    lib.camtl_host_film_forward.argtypes = [INT, PTR, I64, PTR, I64, PTR, I64, PTR, PTR, I64, I64, I64, INT, INT,
                                            ctypes.POINTER(INT)]
    lib.camtl_host_film_backward.argtypes = [INT, PTR, I64, PTR, I64, PTR, I64, PTR, PTR, I64, PTR, PTR, I64, I64,
                                             I64, INT, INT, INT, ctypes.POINTER(INT)]
    lib.camtl_host_task_sum.argtypes = [PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I64]
    for name in ("camtl_host_float_to_half", "camtl_host_half_to_float", "camtl_host_float_to_bfloat16"):
        getattr(lib, name).argtypes = [PTR, PTR, I64]
    for name in ("camtl_host_status_message", "camtl_host_film_status_message", "camtl_host_reduce_status_message"):
        getattr(lib, name).restype = ctypes.c_char_p
    return lib


def _rows(t):
    """t as [M, D] rows, a view when possible (so row strides reach the kernel)."""
    rows = t.reshape(-1, t.shape[-1])
    assert rows.stride(1) == 1
    return rows


def _nan_rows(M, D, dtype, row_stride):
    """[M, D] rows of NaN in a buffer of row_stride (or D) columns: every element must be written, and the
    padding must stay NaN (untouched: check_padding)."""
    return torch.full((M, row_stride or D), float("nan"), dtype=dtype)[:, :D]


def check_padding(rows):
    wide = rows.as_strided((rows.shape[0], rows.stride(0)), (rows.stride(0), 1))
    assert wide[:, rows.shape[1]:].isnan().all(), "a kernel wrote past the end of a row"


def host_forward(lib, x, weight, bias, gamma, beta, index, residual, eps, out_row_stride=None):
    D = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    res2 = _rows(residual) if residual is not None else None
    y = _nan_rows(M, D, x.dtype, out_row_stride)
    mean = torch.empty(M, dtype=torch.float32)
    rstd = torch.empty(M, dtype=torch.float32)
    vec = INT(0)
    status = lib.camtl_host_cln_forward(
        CODES[x.dtype], x2.data_ptr(), x2.stride(0), res2.data_ptr() if res2 is not None else None,
        res2.stride(0) if res2 is not None else 0, weight.data_ptr(), bias.data_ptr(), gamma.data_ptr(),
        gamma.stride(0), beta.data_ptr(), beta.stride(0), index.data_ptr(), y.data_ptr(), y.stride(0),
        mean.data_ptr(), rstd.data_ptr(), M, x.shape[0], D, eps, ctypes.byref(vec))
    assert status == 0, lib.camtl_host_status_message(status)
    check_padding(y)
    return y.reshape(x.shape), mean, rstd, vec.value


def host_backward(lib, dy, x, weight, gamma, beta, index, residual, mean, rstd, chunk_rows, out_row_stride=None):
    D, B = x.shape[-1], x.shape[0]
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    res2 = _rows(residual) if residual is not None else None
    chunks = -(-(M // B) // chunk_rows)
    dx = _nan_rows(M, D, x.dtype, out_row_stride)
    dscale = torch.empty((B, chunks, D), dtype=torch.float32)
    dbias = torch.empty((B, chunks, D), dtype=torch.float32)
    vec = INT(0)
    status = lib.camtl_host_cln_backward(
        CODES[x.dtype], dy2.data_ptr(), dy2.stride(0), x2.data_ptr(), x2.stride(0),
        res2.data_ptr() if res2 is not None else None, res2.stride(0) if res2 is not None else 0,
        weight.data_ptr(), gamma.data_ptr(), gamma.stride(0), beta.data_ptr(), beta.stride(0), index.data_ptr(),
        mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dx.stride(0), dscale.data_ptr(), dbias.data_ptr(),
        M, B, chunk_rows, chunks, D, ctypes.byref(vec))
    assert status == 0, lib.camtl_host_status_message(status)
    check_padding(dx)
    return dx.reshape(x.shape), dscale, dbias, vec.value


def parameter_grads(lib, dscale, dbias, weight, gamma, index):
    """The fp32 parameter gradients from the partials, as the cuda backend forms them (camtl._C's task_sum)."""
    dbeta = host_task_sum(lib, [dscale], index, gamma.shape[0])[0]
    return dict(weight=((1 + gamma.float()) * dbeta).sum(0), bias=dbias.sum((0, 1)), gamma=dbeta * weight.float(),
                beta=dbeta)


def host_task_sum(lib, partials, index, num_tasks):
    """The per-task sums of one or two fp32 [B, P, *F] partial arrays (camtl._C.task_sum's program)."""
    B, P = partials[0].shape[:2]
    features = partials[0].shape[2:]
    outs = [torch.full((num_tasks, *features), float("nan")) for _ in partials]  # every element must be written
    pointers = [p.contiguous().data_ptr() for p in partials] + [None] * (2 - len(partials))
    out_pointers = [o.data_ptr() for o in outs] + [None] * (2 - len(outs))
    status = lib.camtl_host_task_sum(pointers[0], out_pointers[0], pointers[1], out_pointers[1], index.data_ptr(),
                                     B, P, math.prod(features), num_tasks)
    assert status == 0, lib.camtl_host_reduce_status_message(status).decode()
    return outs


def make_inputs(B, L, D, G, dtype, residual, gen):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    x = rand(B, L, D, scale=2.0) + 0.5  # a non-zero mean, so centering matters
    return dict(x=x, weight=rand(D), bias=rand(D), gamma=rand(G, D, scale=0.5), beta=rand(G, D, scale=0.5),
                residual=rand(B, L, D) if residual else None)


def reference(inputs, index, dy, eps):
    """y and every gradient in float64, from the same inputs."""
    leaves = {k: v.double().requires_grad_() for k, v in inputs.items() if v is not None}
    y = torch_ref.conditional_layer_norm(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                                         leaves["beta"], index, eps, leaves.get("residual"))
    y.backward(dy.double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def check_against_torch(lib, B, L, D, G, index, dtype, residual, chunk_rows, gen, eps=1e-5, strided=None):
    inputs = make_inputs(B, L, D, G, dtype, residual, gen)
    dy = torch.randn(B, L, D, generator=gen).to(dtype)
    if strided is not None:  # the same values, each row in a wider buffer (row stride != D), outputs too
        inputs["dy"] = dy
        for name in ("x", "residual", "gamma", "beta", "dy"):
            if inputs[name] is not None:
                wide = torch.randn(*inputs[name].shape[:-1], strided, generator=gen).to(dtype)
                wide[..., :D] = inputs[name]
                inputs[name] = wide[..., :D]
        dy = inputs.pop("dy")
    y, mean, rstd, vec_fwd = host_forward(lib, inputs["x"], inputs["weight"], inputs["bias"], inputs["gamma"],
                                          inputs["beta"], index, inputs["residual"], eps, strided)
    dx, dscale, dbias, vec_bwd = host_backward(lib, dy, inputs["x"], inputs["weight"], inputs["gamma"],
                                               inputs["beta"], index, inputs["residual"], mean, rstd, chunk_rows,
                                               strided)
    y_ref, grads_ref = reference(inputs, index, dy, eps)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(dx.double(), grads_ref["x"], **tol)
    if residual:
        torch.testing.assert_close(dx.double(), grads_ref["residual"], **tol)
    h = inputs["x"].double() + (inputs["residual"].double() if residual else 0)
    torch.testing.assert_close(mean.double(), h.mean(-1).flatten(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (h.var(-1, unbiased=False) + eps).rsqrt().flatten(), rtol=1e-4, atol=0)
    grads = parameter_grads(lib, dscale, dbias, inputs["weight"], inputs["gamma"], index)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), grads_ref[name], **GRAD_TOL, msg=lambda m: f"d{name}: {m}")
    absent = [g for g in range(G) if g not in index.tolist()]
    assert grads["gamma"][absent].eq(0).all() and grads["beta"][absent].eq(0).all()
    return vec_fwd, vec_bwd, (y, dx, dscale, dbias)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [13, 769, 768])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_torch_with_mixed_and_absent_tasks(harness, dtype, D, residual):
    gen = torch.Generator().manual_seed(D * 10 + residual)
    index = torch.tensor([3, 0, 3, 1])  # tasks 2 and 4 of 5 are absent
    vec_fwd, vec_bwd, _ = check_against_torch(harness, 4, 5, D, 5, index, dtype, residual, chunk_rows=2, gen=gen)
    expected = VEC16[dtype] if D % VEC16[dtype] == 0 else 1  # contiguous rows: 16-byte aligned iff D is
    assert vec_fwd == vec_bwd == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_path_with_scalar_tail(harness, dtype):
    """Rows of 13 in buffers of 16 (every row operand and output): aligned rows, so 16-byte vectors, and a
    tail of 13 mod VEC columns. (Contiguous rows are aligned only when VEC divides D: then there is no tail.)"""
    gen = torch.Generator().manual_seed(7)
    vec_fwd, vec_bwd, _ = check_against_torch(harness, 3, 4, 13, 3, torch.tensor([2, 2, 0]), dtype, True,
                                              chunk_rows=3, gen=gen, strided=16)
    assert vec_fwd == vec_bwd == VEC16[dtype]


def test_misaligned_pointer_takes_the_scalar_path(harness):
    gen = torch.Generator().manual_seed(8)
    inputs = make_inputs(2, 3, 64, 2, torch.float32, False, gen)
    shifted = torch.empty(inputs["x"].numel() + 1)[1:].view(inputs["x"].shape)  # 4 bytes past an aligned start
    shifted.copy_(inputs["x"])
    index = torch.tensor([1, 0])
    args = (inputs["weight"], inputs["bias"], inputs["gamma"], inputs["beta"], index, None, 1e-5)
    y_aligned, *_, vec_aligned = host_forward(harness, inputs["x"], *args)
    y_shifted, *_, vec_shifted = host_forward(harness, shifted, *args)
    assert (vec_aligned, vec_shifted) == (4, 1)
    torch.testing.assert_close(y_shifted, y_aligned, rtol=1e-6, atol=1e-6)


def test_widest_row(harness):
    """D = 8192: 512 threads of 16 values each (scalar) or 4 vectors each (fp32)."""
    gen = torch.Generator().manual_seed(9)
    vec_fwd, _, _ = check_against_torch(harness, 2, 1, 8192, 2, torch.tensor([1, 1]), torch.float32, True,
                                        chunk_rows=1, gen=gen)
    assert vec_fwd == 4


def test_reductions_are_bitwise_repeatable(harness):
    gen = torch.Generator().manual_seed(10)
    index = torch.tensor([1, 0, 1])
    outs = []
    for _ in range(2):
        gen.manual_seed(10)
        outs.append(check_against_torch(harness, 3, 7, 769, 2, index, torch.bfloat16, True, chunk_rows=3,
                                        gen=gen)[2])
    for first, second in zip(*outs):
        assert first.view(-1).view(torch.uint8).equal(second.view(-1).view(torch.uint8))


def test_refuses_out_of_range_D_and_bad_chunks(harness):
    x = torch.randn(1, 2, 8193)
    with pytest.raises(AssertionError, match=r"D must be in \[1, 8192\]"):
        host_forward(harness, x, torch.randn(8193), torch.randn(8193), torch.randn(1, 8193), torch.randn(1, 8193),
                     torch.tensor([0]), None, 1e-5)
    x = torch.randn(1, 4, 8)
    y, mean, rstd, _ = host_forward(harness, x, torch.randn(8), torch.randn(8), torch.randn(1, 8),
                                    torch.randn(1, 8), torch.tensor([0]), None, 1e-5)
    with pytest.raises(AssertionError, match="chunk_rows and chunks"):  # 3 chunks of 3 rows for 4 rows: one empty
        dx = torch.empty(4, 8)
        partials = torch.empty(1, 3, 8)
        vec = INT(0)
        status = harness.camtl_host_cln_backward(
            0, x.data_ptr(), 8, x.data_ptr(), 8, None, 0, x.data_ptr(), x.data_ptr(), 8, x.data_ptr(), 8,
            torch.tensor([0]).data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), 8, partials.data_ptr(),
            partials.data_ptr(), 4, 1, 3, 3, 8, ctypes.byref(vec))
        assert status == 0, harness.camtl_host_status_message(status).decode()


def test_conversions_round_like_torch(harness):
    gen = torch.Generator().manual_seed(11)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -24, 2.0 ** -25,
                            1.5 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, float("inf"), float("-inf"),
                            1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.0e38])
    values = torch.cat([special, torch.randn(4000, generator=gen) * torch.logspace(-9, 6, 4000)])
    out = torch.empty(values.shape, dtype=torch.int16)
    harness.camtl_host_float_to_half(values.data_ptr(), out.data_ptr(), values.numel())
    assert out.equal(values.half().view(torch.int16))
    harness.camtl_host_float_to_bfloat16(values.data_ptr(), out.data_ptr(), values.numel())
    assert out.equal(values.bfloat16().view(torch.int16))
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)  # every fp16 bit pattern
    back = torch.empty(halves.shape, dtype=torch.float32)
    harness.camtl_host_half_to_float(halves.data_ptr(), back.data_ptr(), halves.numel())
    expected = halves.view(torch.float16).float()
    finite = expected.isfinite() | expected.isinf()
    assert back[finite].equal(expected[finite]) and back[~finite].isnan().all()


# ---- FiLM (csrc/film.h) and the per-task sum (csrc/task_reduce.h) ---------------------------------------------------

SHARED_ROWS = 4  # film::kSharedRows: the chunk_rows of a shared x's backward


def host_film_forward(lib, x, gamma, beta, index, out_row_stride=None):
    B, (L, D) = index.shape[0], x.shape[-2:]
    x2 = _rows(x)
    out = _nan_rows(B * L, D, x.dtype, out_row_stride)
    vec = INT(0)
    status = lib.camtl_host_film_forward(
        CODES[x.dtype], x2.data_ptr(), x2.stride(0), gamma.data_ptr(), gamma.stride(0), beta.data_ptr(),
        beta.stride(0), index.data_ptr(), out.data_ptr(), out.stride(0), B, L, D, int(x.dim() == 2), ctypes.byref(vec))
    assert status == 0, lib.camtl_host_film_status_message(status).decode()
    check_padding(out)
    return out.reshape(B, L, D), vec.value


def host_film_backward(lib, dy, x, gamma, index, chunk_rows, out_row_stride=None):
    """dx, the fp32 partials dscale, dshift [B, chunks, D] and the vector width taken."""
    B, (L, D) = index.shape[0], x.shape[-2:]
    shared = x.dim() == 2
    chunk_rows = SHARED_ROWS if shared else chunk_rows
    chunks = -(-L // chunk_rows)
    x2, dy2 = _rows(x), _rows(dy)
    dx = _nan_rows(x2.shape[0], D, x.dtype, out_row_stride)
    dscale = torch.full((B, chunks, D), float("nan"))
    dshift = torch.full((B, chunks, D), float("nan"))
    vec = INT(0)
    status = lib.camtl_host_film_backward(
        CODES[x.dtype], dy2.data_ptr(), dy2.stride(0), x2.data_ptr(), x2.stride(0), gamma.data_ptr(),
        gamma.stride(0), index.data_ptr(), dx.data_ptr(), dx.stride(0), dscale.data_ptr(), dshift.data_ptr(), B, L,
        chunk_rows, chunks, D, int(shared), ctypes.byref(vec))
    assert status == 0, lib.camtl_host_film_status_message(status).decode()
    check_padding(dx)
    return dx.reshape(x.shape), dscale, dshift, vec.value


def film_inputs(B, L, D, G, dtype, shared, gen, row_stride=None):
    """x, gamma, beta, dy (fresh, non-zero); with row_stride, each row sits in a wider buffer."""
    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype)
        if row_stride is None:
            return t
        wide = torch.randn(*shape[:-1], row_stride, generator=gen).to(dtype)
        wide[..., :shape[-1]] = t
        return wide[..., :shape[-1]]
    x = rand(*((L, D) if shared else (B, L, D)), scale=2.0)
    return x, rand(G, D, scale=0.5), rand(G, D, scale=0.5), rand(B, L, D)


def film_reference(x, gamma, beta, index, dy):
    """out and the gradients of x, gamma, beta in float64 (the torch backend), from the same inputs."""
    leaves = [t.double().requires_grad_() for t in (x, gamma, beta)]
    out = torch_ref.film(*leaves, index)
    out.backward(dy.double())
    return out.detach(), [t.grad for t in leaves]


def check_film_against_torch(lib, B, L, D, G, index, dtype, shared, chunk_rows, gen, row_stride=None):
    x, gamma, beta, dy = film_inputs(B, L, D, G, dtype, shared, gen, row_stride)
    out, vec_fwd = host_film_forward(lib, x, gamma, beta, index, row_stride)
    dx, dscale, dshift, vec_bwd = host_film_backward(lib, dy, x, gamma, index, chunk_rows, row_stride)
    dgamma, dbeta = host_task_sum(lib, [dscale, dshift], index, G)
    out_ref, (dx_ref, dgamma_ref, dbeta_ref) = film_reference(x, gamma, beta, index, dy)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), out_ref, **tol)
    # a shared x's dx sums B products: its rounding error grows with B, as the fp32 parameter gradients' do
    torch.testing.assert_close(dx.double(), dx_ref, **(tol if not shared or dtype != torch.float32 else GRAD_TOL))
    torch.testing.assert_close(dgamma.double(), dgamma_ref, **GRAD_TOL, msg=lambda m: f"dgamma: {m}")
    torch.testing.assert_close(dbeta.double(), dbeta_ref, **GRAD_TOL, msg=lambda m: f"dbeta: {m}")
    absent = [g for g in range(G) if g not in index.tolist()]
    assert dgamma[absent].eq(0).all() and dbeta[absent].eq(0).all()
    present = sorted(set(index.tolist()))
    assert dgamma[present].ne(0).any(-1).all() and dbeta[present].ne(0).any(-1).all()
    return vec_fwd, vec_bwd, (out, dx, dscale, dshift, dgamma, dbeta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [37, 100, 768])
@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_film_matches_torch_with_mixed_and_absent_tasks(harness, dtype, D, shared):
    """The Triton tests' inputs (B 4, L 7, tasks out of order, one task of the table absent), odd D too."""
    gen = torch.Generator().manual_seed(D * 10 + shared)
    index = torch.tensor([2, 0, 2, 1])  # task 3 of 4 absent
    vec_fwd, vec_bwd, _ = check_film_against_torch(harness, 4, 7, D, 4, index, dtype, shared, chunk_rows=3,
                                                   gen=gen)
    expected = VEC16[dtype] if D % VEC16[dtype] == 0 else 1  # contiguous rows: 16-byte aligned iff D is
    assert vec_fwd == vec_bwd == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_film_vector_path_with_scalar_tail(harness, dtype, shared):
    """Rows of 13 in buffers of 16 (inputs and outputs): 16-byte vectors and a tail of 13 mod VEC columns."""
    gen = torch.Generator().manual_seed(17 + shared)
    vec_fwd, vec_bwd, _ = check_film_against_torch(harness, 3, 5, 13, 3, torch.tensor([2, 2, 0]), dtype, shared,
                                                   chunk_rows=2, gen=gen, row_stride=16)
    assert vec_fwd == vec_bwd == VEC16[dtype]


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_film_long_examples_reduce_over_several_chunks(harness, shared):
    """L = 45 in chunks of 4 rows: 12 partials per example, the last one of a single row."""
    gen = torch.Generator().manual_seed(45)
    *_, (_, _, dscale, _, _, _) = check_film_against_torch(harness, 2, 45, 9, 2, torch.tensor([1, 1]),
                                                           torch.float32, shared, chunk_rows=4, gen=gen)
    assert dscale.shape[1] == 12


def test_film_widest_row_and_misaligned_pointer(harness):
    """D = 8192 in fp32 vectors; then x 4 bytes past an aligned start: the scalar path, the same values."""
    gen = torch.Generator().manual_seed(8192)
    vec_fwd, vec_bwd, (out, dx, *_) = check_film_against_torch(harness, 2, 2, 8192, 2, torch.tensor([1, 0]),
                                                               torch.float32, False, chunk_rows=1, gen=gen)
    assert vec_fwd == vec_bwd == 4
    x, gamma, beta, dy = film_inputs(2, 3, 64, 2, torch.float32, False, gen)
    shifted = torch.empty(x.numel() + 1)[1:].view(x.shape)
    shifted.copy_(x)
    index = torch.tensor([1, 0])
    out_aligned, vec_aligned = host_film_forward(harness, x, gamma, beta, index)
    out_shifted, vec_shifted = host_film_forward(harness, shifted, gamma, beta, index)
    assert (vec_aligned, vec_shifted) == (4, 1)
    assert out_shifted.equal(out_aligned)
    *grads_aligned, vec_aligned = host_film_backward(harness, dy, x, gamma, index, chunk_rows=2)
    *grads_shifted, vec_shifted = host_film_backward(harness, dy, shifted, gamma, index, chunk_rows=2)
    assert (vec_aligned, vec_shifted) == (4, 1)
    for aligned, shifted_grad in zip(grads_aligned, grads_shifted):
        assert shifted_grad.equal(aligned)


def test_film_empty_batch_gives_a_zero_shared_dx(harness):
    x, gamma = torch.randn(5, 8), torch.randn(2, 8)
    empty = torch.empty(0, dtype=torch.int64)
    dx, dscale, dshift, _ = host_film_backward(harness, torch.empty(0, 5, 8), x, gamma, empty, SHARED_ROWS)
    assert dx.eq(0).all() and dscale.shape == (0, 2, 8)
    out, _ = host_film_forward(harness, x, gamma, gamma, empty)
    assert out.shape == (0, 5, 8)


def test_film_refuses_bad_arguments(harness):
    x = torch.randn(1, 2, 8193)
    with pytest.raises(AssertionError, match=r"D must be in \[1, 8192\]"):
        host_film_forward(harness, x, torch.randn(1, 8193), torch.randn(1, 8193), torch.tensor([0]))
    x, gamma, _, dy = film_inputs(1, 8, 4, 1, torch.float32, True, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match=r"a shared x needs chunk_rows == 4"):
        chunks = torch.empty(1, 4, 4)
        vec = INT(0)
        status = harness.camtl_host_film_backward(
            0, dy.data_ptr(), 4, x.data_ptr(), 4, gamma.data_ptr(), 4, torch.tensor([0]).data_ptr(),
            torch.empty(8, 4).data_ptr(), 4, chunks.data_ptr(), chunks.data_ptr(), 1, 8, 2, 2, 4, 1,
            ctypes.byref(vec))
        assert status == 0, harness.camtl_host_film_status_message(status).decode()
    with pytest.raises(AssertionError, match="chunk_rows and chunks must cover"):  # 4 chunks of 3 for 8 rows
        status = harness.camtl_host_film_backward(
            0, dy.data_ptr(), 4, x.data_ptr(), 4, gamma.data_ptr(), 4, torch.tensor([0]).data_ptr(),
            torch.empty(8, 4).data_ptr(), 4, chunks.data_ptr(), chunks.data_ptr(), 1, 8, 3, 4, 4, 0,
            ctypes.byref(vec))
        assert status == 0, harness.camtl_host_film_status_message(status).decode()


def in_order_task_sum(partials, index, num_tasks):
    """The per-task sum in the order the kernel adds (b, then p, ascending) in fp64, rounded once to fp32."""
    total = torch.zeros((num_tasks, *partials.shape[2:]), dtype=torch.float64)
    for b in range(partials.shape[0]):
        for p in range(partials.shape[1]):
            total[index[b]] += partials[b, p].double()
    return total.float()


def test_task_sum_adds_in_a_fixed_order_in_fp64(harness):
    """Bitwise: the kernel's sum is the fixed-order fp64 one (so it repeats run to run and matches the device),
    and agrees with the torch path's one-hot GEMM; absent tasks get exact zeros."""
    gen = torch.Generator().manual_seed(12)
    # terms of very different sizes, so that an fp32 sum or another order would change the bits
    partials = torch.randn(6, 5, 3, 7, generator=gen) * torch.logspace(-4, 4, 7)
    second = torch.randn(6, 5, 3, 7, generator=gen)
    index = torch.tensor([3, 0, 3, 3, 1, 0])  # tasks 2 and 4 of 5 absent
    first_sum, second_sum = host_task_sum(harness, [partials, second], index, 5)
    assert first_sum.equal(in_order_task_sum(partials, index, 5))
    assert second_sum.equal(in_order_task_sum(second, index, 5))
    torch.testing.assert_close(first_sum, per_task_sum(partials, index, 5), rtol=1e-6, atol=0)
    assert first_sum[[2, 4]].eq(0).all() and not first_sum[[0, 1, 3]].eq(0).any()
    again = host_task_sum(harness, [partials], index, 5)[0]
    assert again.view(torch.int32).equal(first_sum.view(torch.int32))
    # Where even fp64 rounds, the order shows: 1 + 2^60 - 2^60 + 1 is 1 in this order, 0 or 2 in others.
    crafted = torch.tensor([[[1.0], [2.0 ** 60]], [[-2.0 ** 60], [1.0]]])
    assert host_task_sum(harness, [crafted], torch.tensor([0, 0]), 1)[0].item() == 1.0


def test_task_sum_of_an_empty_batch_is_zero(harness):
    sums = host_task_sum(harness, [torch.empty(0, 3, 4)], torch.empty(0, dtype=torch.int64), 2)[0]
    assert sums.shape == (2, 4) and sums.eq(0).all()


def test_film_reductions_are_bitwise_repeatable(harness):
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(70)
        outs.append(check_film_against_torch(harness, 3, 11, 70, 3, torch.tensor([1, 0, 1]), torch.bfloat16, False,
                                             chunk_rows=4, gen=gen)[2])
    for first, second in zip(*outs):
        assert first.reshape(-1).view(torch.uint8).equal(second.reshape(-1).view(torch.uint8))


# ---- the cuda backend's Python glue (camtl.backends.cuda_ext and the ops' wiring), run on the host harness -------

class HostExtension:
    """camtl._C's launch functions (same arguments) on the host harness: the stream is dropped, a refused
    argument raises as the binding's does."""

    FILM_SHARED_ROWS = SHARED_ROWS

    def __init__(self, lib):
        self.lib = lib

    def _run(self, fn, message, args, vec_used=True):
        extra = (ctypes.byref(INT(0)),) if vec_used else ()
        status = fn(*args[:-1], *extra)
        if status:
            raise ValueError(message(status).decode())

    def cln_forward(self, *args):
        self._run(self.lib.camtl_host_cln_forward, self.lib.camtl_host_status_message, args)

    def cln_backward(self, *args):
        self._run(self.lib.camtl_host_cln_backward, self.lib.camtl_host_status_message, args)

    def film_forward(self, *args):
        self._run(self.lib.camtl_host_film_forward, self.lib.camtl_host_film_status_message, args)

    def film_backward(self, *args):
        self._run(self.lib.camtl_host_film_backward, self.lib.camtl_host_film_status_message, args)

    def task_sum(self, *args):
        self._run(self.lib.camtl_host_task_sum, self.lib.camtl_host_reduce_status_message, args, vec_used=False)


@pytest.fixture
def host_backend(harness, monkeypatch):
    """cuda_ext launching on the host harness, for CPU tensors (4 SMs: several chunks per example)."""
    from camtl.backends import cuda_ext

    monkeypatch.setattr(cuda_ext, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_ext, "extension", lambda: HostExtension(harness))
    monkeypatch.setattr(cuda_ext, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda_ext, "_stream", lambda device: 0)
    monkeypatch.setattr(cuda_ext, "_sm_count", lambda device: 4)
    return cuda_ext


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64 ids", "int32 ids"])
def test_cuda_backend_film_through_its_ops(host_backend, dtype, shared, index_dtype):
    """The cuda backend's film (its torch.library ops, autograd, cuda_ext's checks and launches, the task sum)
    against the torch backend, forward and every gradient."""
    from camtl.ops.film import _cuda_film

    gen = torch.Generator().manual_seed(23 + shared)
    x, gamma, beta, dy = film_inputs(4, 9, 37, 4, dtype, shared, gen)
    index = torch.tensor([2, 0, 2, 1], dtype=index_dtype)  # task 3 absent
    leaves = [t.detach().requires_grad_() for t in (x, gamma, beta)]
    out = _cuda_film(*leaves, index)
    out.backward(dy)
    out_ref, grads_ref = film_reference(x, gamma, beta, index.long(), dy)
    torch.testing.assert_close(out.detach().double(), out_ref, **TOL[dtype])
    for name, leaf, ref in zip(("x", "gamma", "beta"), leaves, grads_ref):
        assert leaf.grad.dtype == dtype
        tol = TOL[dtype] if dtype != torch.float32 else GRAD_TOL  # fp32 sums over rows, rounded to the dtype once
        torch.testing.assert_close(leaf.grad.double(), ref, **tol, msg=lambda m: f"d{name}: {m}")
    assert leaves[1].grad[3].eq(0).all() and leaves[2].grad[3].eq(0).all()


def test_cuda_backend_layer_norm_through_its_ops(host_backend):
    """The cuda backend's conditional layer norm, its backward's partials summed by the task sum, against torch."""
    from camtl.ops.layer_norm import _cuda_conditional_layer_norm

    gen = torch.Generator().manual_seed(31)
    inputs = make_inputs(4, 9, 769, 5, torch.float32, True, gen)
    dy = torch.randn(4, 9, 769, generator=gen)
    index = torch.tensor([3, 0, 3, 1], dtype=torch.int32)  # tasks 2 and 4 absent
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y = _cuda_conditional_layer_norm(leaves["x"], leaves["weight"], leaves["bias"], leaves["gamma"],
                                     leaves["beta"], index, 1e-5, leaves["residual"])
    y.backward(dy)
    y_ref, grads_ref = reference(inputs, index.long(), dy, 1e-5)
    torch.testing.assert_close(y.detach().double(), y_ref, **TOL[torch.float32])
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad.double(), grads_ref[name], **GRAD_TOL, msg=lambda m: f"d{name}: {m}")
    assert leaves["gamma"].grad[[2, 4]].eq(0).all()


def test_cuda_backend_per_task_sum_through_cuda_ext(host_backend):
    gen = torch.Generator().manual_seed(41)
    partials, second = torch.randn(5, 3, 2, 6, generator=gen), torch.randn(5, 3, 2, 6, generator=gen)
    index = torch.tensor([1, 1, 0, 3, 1])
    sums = host_backend.per_task_sums([partials, second], index, 4)
    assert [s.shape for s in sums] == [(4, 2, 6)] * 2
    assert sums[0].equal(in_order_task_sum(partials, index, 4)) and sums[1].equal(in_order_task_sum(second, index, 4))
    assert host_backend.per_task_sum(torch.empty(0, 3, 6), torch.empty(0, dtype=torch.int64), 2).eq(0).all()
    with pytest.raises(TypeError, match=r"argument 'partials' must have dtype torch.float32"):
        host_backend.per_task_sum(partials.double(), index, 4)
    with pytest.raises(IndexError, match=r"argument 'index' holds 4, out of range"):
        host_backend.per_task_sum(partials, torch.tensor([1, 1, 0, 4, 1]), 4)
