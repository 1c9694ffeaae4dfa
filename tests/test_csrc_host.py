"""The CUDA kernels' arithmetic, run on the CPU: csrc/host_harness.cpp runs the row programs of
csrc/layer_norm.h over the whole grid (HostBlock stands in for the CUDA block, with the device's sum order),
compared with the torch backend. Built once per source hash with g++ (no GPU or CUDA toolkit needed)."""

import ctypes
import hashlib
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
SOURCES = ("host_harness.cpp", "host_block.h", "block.h", "layer_norm.h", "camtl_types.h")
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
    for name in ("camtl_host_float_to_half", "camtl_host_half_to_float", "camtl_host_float_to_bfloat16"):
        getattr(lib, name).argtypes = [PTR, PTR, I64]
    lib.camtl_host_status_message.restype = ctypes.c_char_p
    return lib


def _rows(t):
    """t as [M, D] rows, a view when possible (so row strides reach the kernel)."""
    rows = t.reshape(-1, t.shape[-1])
    assert rows.stride(1) == 1
    return rows


def _empty_rows(M, D, dtype, row_stride):
    return torch.empty((M, row_stride or D), dtype=dtype)[:, :D]


def host_forward(lib, x, weight, bias, gamma, beta, index, residual, eps, out_row_stride=None):
    D = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    res2 = _rows(residual) if residual is not None else None
    y = _empty_rows(M, D, x.dtype, out_row_stride)
    mean = torch.empty(M, dtype=torch.float32)
    rstd = torch.empty(M, dtype=torch.float32)
    vec = INT(0)
    status = lib.camtl_host_cln_forward(
        CODES[x.dtype], x2.data_ptr(), x2.stride(0), res2.data_ptr() if res2 is not None else None,
        res2.stride(0) if res2 is not None else 0, weight.data_ptr(), bias.data_ptr(), gamma.data_ptr(),
        gamma.stride(0), beta.data_ptr(), beta.stride(0), index.data_ptr(), y.data_ptr(), y.stride(0),
        mean.data_ptr(), rstd.data_ptr(), M, x.shape[0], D, eps, ctypes.byref(vec))
    assert status == 0, lib.camtl_host_status_message(status)
    return y.reshape(x.shape), mean, rstd, vec.value


def host_backward(lib, dy, x, weight, gamma, beta, index, residual, mean, rstd, chunk_rows, out_row_stride=None):
    D, B = x.shape[-1], x.shape[0]
    x2, dy2 = _rows(x), _rows(dy)
    M = x2.shape[0]
    res2 = _rows(residual) if residual is not None else None
    chunks = -(-(M // B) // chunk_rows)
    dx = _empty_rows(M, D, x.dtype, out_row_stride)
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
    return dx.reshape(x.shape), dscale, dbias, vec.value


def parameter_grads(dscale, dbias, weight, gamma, index):
    """The fp32 parameter gradients from the partials, as the Triton backend's _cln_bwd forms them."""
    dbeta = per_task_sum(dscale, index, gamma.shape[0])
    return dict(weight=((1 + gamma.float()) * dbeta).sum(0), bias=dbias.sum((0, 1)), gamma=dbeta * weight.float(),
                beta=dbeta)


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
    grads = parameter_grads(dscale, dbias, inputs["weight"], inputs["gamma"], index)
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
