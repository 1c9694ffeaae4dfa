"""The cuda backend's Python side, without a GPU: its argument checks, its torch.library ops, and camtl._C
itself when it is built (it imports, reports its archs, returns error codes instead of aborting, and links
neither torch nor a dynamic cudart)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from camtl.backends import cuda_ext
from camtl.ops.layer_norm import _cuda_conditional_layer_norm as cuda_layer_norm

try:
    import camtl._C as ext
except ImportError:
    ext = None

needs_ext = pytest.mark.skipif(ext is None, reason="camtl._C is not built here (no nvcc, or CAMTL_SKIP_CUDA_BUILD=1)")
B, L, D, G = 2, 3, 8, 3


def _inputs(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(B, L, D, generator=gen), weight=torch.randn(D, generator=gen),
                gamma=torch.randn(G, D, generator=gen), beta=torch.randn(G, D, generator=gen),
                index=torch.tensor([2, 0]), residual=torch.randn(B, L, D, generator=gen),
                bias=torch.randn(D, generator=gen))
    return {k: v.to(device) for k, v in args.items()}


BAD = {
    "weight": (lambda a: a["weight"][:-1], ValueError, r"argument 'weight' must have shape \[8\], got \[7\]"),
    "bias": (lambda a: a["bias"].half(), TypeError, "argument 'bias' must have dtype torch.float32"),
    "gamma": (lambda a: a["gamma"][0], ValueError, r"argument 'gamma' must be a tensor of shape \[G, D\]"),
    "beta": (lambda a: a["beta"][:2], ValueError, r"argument 'beta' must have shape \[3, 8\], got \[2, 8\]"),
    "residual": (lambda a: a["residual"][:, :2], ValueError, r"argument 'residual' must have shape \[2, 3, 8\]"),
    "index": (lambda a: a["index"].int(), TypeError, "argument 'index' must be an int64 tensor"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_checks_name_the_bad_argument(name):
    make_bad, error, message = BAD[name]
    args = _inputs()
    cuda_ext._check_params(**args)  # the good arguments pass
    args[name] = make_bad(args)
    with pytest.raises(error, match=message):
        cuda_ext._check_params(**args)


def test_checks_index_range_and_device():
    args = _inputs()
    args["index"] = torch.tensor([3, 0])
    with pytest.raises(IndexError, match=r"argument 'index' holds 3, out of range: task ids must be in \[0, 3\)"):
        cuda_ext._check_params(**args)
    args = _inputs()
    args["weight"] = args["weight"].to("meta")
    with pytest.raises(ValueError, match="argument 'weight' must be on cpu"):
        cuda_ext._check_params(**args)


def test_refuses_cpu_tensors_before_touching_the_extension():
    a = _inputs()
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor, got one on cpu"):
        cuda_ext.layer_norm_forward(a["x"], a["weight"], a["bias"], a["gamma"], a["beta"], a["index"], None, 1e-5)
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        cuda_layer_norm(a["x"], a["weight"], a["bias"], a["gamma"], a["beta"], a["index"])


def test_ops_are_registered_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = _inputs()
    with FakeTensorMode() as mode:
        f = {k: mode.from_tensor(v) for k, v in a.items()}
        y, mean, rstd = torch.ops.camtl.cuda_conditional_layer_norm_fwd(
            f["x"], f["weight"], f["bias"], f["gamma"], f["beta"], f["index"], f["residual"], 1e-5)
        grads = torch.ops.camtl.cuda_conditional_layer_norm_bwd(
            f["x"], f["x"], f["weight"], f["gamma"], f["beta"], f["index"], f["residual"], mean, rstd)
    assert (y.shape, mean.shape, rstd.shape, mean.dtype) == ((B, L, D), (B, L), (B, L), torch.float32)
    assert [tuple(g.shape) for g in grads] == [(B, L, D), (D,), (D,), (G, D), (G, D)]


@needs_ext
def test_extension_reports_its_archs():
    archs = ext.ARCHS.split(";")
    assert archs and all(a.removeprefix("compute_").rstrip("a").isdigit() for a in archs), ext.ARCHS
    assert ext.MAX_D == cuda_ext.MAX_D and ext.runtime_version() >= 12000
    info = cuda_ext.extension_info()
    assert info["archs"] == ext.ARCHS


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers of a machine without a GPU")
def test_without_a_gpu_calls_return_errors_not_aborts():
    code = ("import camtl._C as C\n"
            "status, count, message = C.device_count()\n"
            "assert status != 0 and count == 0, (status, count)\n"
            "p = 1 << 20  # 16-byte aligned, never dereferenced: the launch fails first\n"
            "try:\n"
            "    C.cln_forward(0, p, 8, 0, 0, p, p, p, 8, p, 8, p, p, 8, p, p, 4, 2, 8, 1e-5, 0)\n"
            "except RuntimeError as e:\n"
            "    assert str(e).startswith('camtl._C.cln_forward: CUDA error'), e\n"
            "else:\n"
            "    raise AssertionError('no error')\n"
            "print('ok', message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


@needs_ext
def test_refused_arguments_raise_value_errors_naming_the_op():
    with pytest.raises(ValueError, match=r"camtl._C.cln_forward: D must be in \[1, 8192\]"):
        ext.cln_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2, 8193, 1e-5, 0)
    with pytest.raises(ValueError, match="camtl._C.cln_forward: a required pointer is null"):
        ext.cln_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2, 8, 1e-5, 0)
    with pytest.raises(ValueError, match="camtl._C.cln_backward: dtype must be"):
        ext.cln_backward(7, *[0] * 18, 4, 2, 2, 1, 8, 0)


@needs_ext
@pytest.mark.skipif(shutil.which("ldd") is None or shutil.which("nm") is None, reason="needs ldd and nm")
def test_links_no_torch_and_no_dynamic_cudart():
    so = ext.__file__
    needed = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libcudart", "libpython", "libcuda."):
        assert lib not in needed, needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True,
                               check=True).stdout.split()
    assert not [s for s in undefined if "c10" in s or "torch" in s or s.startswith(("cuda", "_Z2at"))]
    assert os.path.getsize(so) > 0


def test_the_cuda_backend_runs_the_layer_norm_and_says_why_it_is_off_here():
    from camtl.backends import BackendUnavailableError, backend_state, implemented_ops

    assert implemented_ops("cuda") == ("conditional_layer_norm",)
    state = backend_state("cuda")
    assert state.ops == ("conditional_layer_norm",) and "camtl._C" in state.reason
    if not torch.cuda.is_available():
        assert not state.available
        import camtl

        a = _inputs()
        with camtl.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
            camtl.ops.conditional_layer_norm(a["x"], a["weight"], a["bias"], a["gamma"], a["beta"], a["index"])
