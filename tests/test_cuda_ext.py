"""The cuda backend's Python side, without a GPU: its argument checks (conditional layer norm, FiLM, the
per-task sum), its torch.library ops, and camtl._C itself when it is built (it imports, reports its archs,
returns error codes instead of aborting, and links neither torch nor a dynamic cudart)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from camtl.backends import cuda_ext
from camtl.ops.film import _cuda_film as cuda_film
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
            "calls = {'cln_forward': lambda: C.cln_forward(0, p, 8, 0, 0, p, p, p, 8, p, 8, p, p, 8, p, p, 4, 2, 8,"
            " 1e-5, 0),\n"
            "         'film_forward': lambda: C.film_forward(0, p, 8, p, 8, p, 8, p, p, 8, 2, 2, 8, False, 0),\n"
            "         'film_backward': lambda: C.film_backward(0, p, 8, p, 8, p, 8, p, p, 8, p, p, 2, 2, 2, 1, 8,"
            " False, 0),\n"
            "         'task_sum': lambda: C.task_sum(p, p, 0, 0, p, 2, 1, 8, 2, 0)}\n"
            "for name, call in calls.items():\n"
            "    try:\n"
            "        call()\n"
            "    except RuntimeError as e:\n"
            "        assert str(e).startswith(f'camtl._C.{name}: CUDA error'), e\n"
            "    else:\n"
            "        raise AssertionError(f'{name}: no error')\n"
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
def test_film_and_task_sum_refuse_arguments_naming_the_op():
    p = 1 << 20  # never dereferenced: the checks refuse first
    with pytest.raises(ValueError, match=r"camtl._C.film_forward: D must be in \[1, 8192\]"):
        ext.film_forward(0, p, 8, p, 8, p, 8, p, p, 8, 2, 2, 8193, False, 0)
    with pytest.raises(ValueError, match="camtl._C.film_forward: a required pointer is null"):
        ext.film_forward(0, 0, 8, p, 8, p, 8, p, p, 8, 2, 2, 8, False, 0)
    with pytest.raises(ValueError, match="camtl._C.film_forward: L .rows per example. must be >= 0"):
        ext.film_forward(0, p, 8, p, 8, p, 8, p, p, 8, 2, -1, 8, False, 0)
    with pytest.raises(ValueError, match="camtl._C.film_backward: a shared x needs chunk_rows == 4"):
        ext.film_backward(0, p, 8, p, 8, p, 8, p, p, 8, p, p, 2, 8, 2, 4, 8, True, 0)
    with pytest.raises(ValueError, match="camtl._C.film_backward: chunk_rows and chunks must cover"):
        ext.film_backward(0, p, 8, p, 8, p, 8, p, p, 8, p, p, 2, 8, 3, 4, 8, False, 0)
    with pytest.raises(ValueError, match="camtl._C.film_backward: a required pointer is null"):
        ext.film_backward(0, p, 8, p, 8, p, 8, 0, p, 8, p, p, 2, 8, 4, 2, 8, False, 0)
    with pytest.raises(ValueError, match="camtl._C.task_sum: B, P, F and G must be >= 0"):
        ext.task_sum(p, p, 0, 0, p, -1, 1, 8, 2, 0)
    with pytest.raises(ValueError, match="camtl._C.task_sum: a required pointer is null"):
        ext.task_sum(0, p, 0, 0, p, 2, 1, 8, 2, 0)
    assert ext.FILM_SHARED_ROWS == 4


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


def test_the_cuda_backend_runs_the_layer_norm_and_film_and_says_why_it_is_off_here():
    from camtl.backends import BackendUnavailableError, backend_state, implemented_ops

    assert set(implemented_ops("cuda")) == {"conditional_layer_norm", "film"}
    state = backend_state("cuda")
    assert set(state.ops) == {"conditional_layer_norm", "film"} and "camtl._C" in state.reason
    if not torch.cuda.is_available():
        assert not state.available
        import camtl

        a = _inputs()
        with camtl.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
            camtl.ops.conditional_layer_norm(a["x"], a["weight"], a["bias"], a["gamma"], a["beta"], a["index"])
        with camtl.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
            camtl.ops.film(a["x"], a["gamma"], a["beta"], a["index"])


# ---- FiLM and the per-task sum -------------------------------------------------------------------------------------

def _film_inputs(shared=False):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*((L, D) if shared else (B, L, D)), generator=gen)
    return dict(x=x, gamma=torch.randn(G, D, generator=gen), beta=torch.randn(G, D, generator=gen),
                index=torch.tensor([2, 0]))


FILM_BAD = {
    "gamma rank": (lambda a: a.update(gamma=a["gamma"][0]), ValueError,
                   r"argument 'gamma' must be a tensor of shape \[G, D\]=\[G, 8\], got \[8\]"),
    "gamma D": (lambda a: a.update(gamma=a["gamma"][:, :5]), ValueError,
                r"argument 'gamma' must have shape \[3, 8\], got \[3, 5\]"),
    "gamma dtype": (lambda a: a.update(gamma=a["gamma"].double()), TypeError,
                    "argument 'gamma' must have dtype torch.float32"),
    "index dtype": (lambda a: a.update(index=a["index"].int()), TypeError, "argument 'index' must be an int64 tensor"),
    "index shape": (lambda a: a.update(index=torch.tensor([0, 1, 2])), ValueError,
                    r"argument 'index' must have shape \[B\]=\[2\], got \[3\]"),
    "index range": (lambda a: a.update(index=torch.tensor([0, 3])), IndexError,
                    r"argument 'index' holds 3, out of range: task ids must be in \[0, 3\)"),
}


@pytest.mark.parametrize("case", sorted(FILM_BAD))
def test_film_checks_name_the_bad_argument(case):
    make_bad, error, message = FILM_BAD[case]
    args = _film_inputs()
    assert cuda_ext._check_film_params(args["x"], args["gamma"], args["index"]) == B  # the good arguments pass
    make_bad(args)
    with pytest.raises(error, match=message) as info:
        cuda_ext._check_film_params(args["x"], args["gamma"], args["index"])
    assert str(info.value).startswith(cuda_ext.FILM_OP)


def test_film_refuses_cpu_tensors_before_touching_the_extension():
    a = _film_inputs()
    with pytest.raises(ValueError, match=r"camtl.ops.film \(cuda backend\): argument 'x' must be a CUDA tensor"):
        cuda_ext.film_forward(a["x"], a["gamma"], a["beta"], a["index"])
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        cuda_ext.film_backward(a["x"], a["x"], a["gamma"], a["index"])
    with pytest.raises(ValueError, match="argument 'x' must be a CUDA tensor"):
        cuda_film(a["x"], a["gamma"], a["beta"], a["index"])
    with pytest.raises(ValueError, match=r"per_task_sum \(cuda backend\): argument 'partials' must be a CUDA tensor"):
        cuda_ext.per_task_sum(torch.randn(B, 2, D), a["index"], G)


def test_per_task_sum_checks():
    index = torch.tensor([2, 0])
    with pytest.raises(ValueError, match="takes one or two partial arrays, got 3"):
        cuda_ext.per_task_sums([torch.randn(B, 2, D)] * 3, index, G)
    with pytest.raises(ValueError, match=r"argument 'partials' must be a tensor of shape \[B, P, \*F\]"):
        cuda_ext.per_task_sum(torch.randn(D), index, G)


@pytest.mark.parametrize("shared", [False, True], ids=["x [B, L, D]", "x [L, D] shared"])
def test_film_ops_are_registered_with_fake_implementations(shared):
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = _film_inputs(shared)
    with FakeTensorMode() as mode:
        f = {k: mode.from_tensor(v) for k, v in a.items()}
        out = torch.ops.camtl.cuda_film_fwd(f["x"], f["gamma"], f["beta"], f["index"])
        grads = torch.ops.camtl.cuda_film_bwd(f["x"].new_empty(B, L, D), f["x"], f["gamma"], f["index"])
    assert tuple(out.shape) == (B, L, D)
    assert [tuple(g.shape) for g in grads] == [tuple(a["x"].shape), (G, D), (G, D)]


def test_cuda_wiring_widens_int32_task_ids(monkeypatch):
    """ops.film and ops.conditional_layer_norm take int32 task ids; the cuda launches get them as int64."""
    seen = []

    def fake_film_forward(x, gamma, beta, index):
        seen.append(index.dtype)
        return x.new_empty((index.shape[0], *x.shape[-2:]))

    def fake_layer_norm_forward(x, weight, bias, gamma, beta, index, residual, eps):
        seen.append(index.dtype)
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1]), x.new_empty(x.shape[:-1])

    monkeypatch.setattr(cuda_ext, "film_forward", fake_film_forward)
    monkeypatch.setattr(cuda_ext, "layer_norm_forward", fake_layer_norm_forward)
    f, a = _film_inputs(), _inputs()
    cuda_film(f["x"], f["gamma"], f["beta"], f["index"].int())
    cuda_layer_norm(a["x"], a["weight"], a["bias"], a["gamma"], a["beta"], a["index"].int())
    assert seen == [torch.int64, torch.int64]


def test_cuda_backwards_sum_partials_with_the_extension(monkeypatch):
    """The cuda backward ops sum their partials per task with camtl._C's task_sum (cuda_ext.per_task_sums), not
    with the torch path's one-hot GEMM: FiLM's two partials in one launch, the layer norm's one."""
    calls = []

    def fake_sums(partials, index, num_tasks):
        calls.append(len(partials))
        return [torch.full((num_tasks, *p.shape[2:]), 7.0) for p in partials]

    partials = torch.ones(B, 2, D)
    monkeypatch.setattr(cuda_ext, "per_task_sums", fake_sums)
    monkeypatch.setattr(cuda_ext, "film_backward",
                        lambda dy, x, gamma, index: (torch.zeros_like(x), partials, partials))
    monkeypatch.setattr(cuda_ext, "layer_norm_backward",
                        lambda dy, x, weight, gamma, beta, index, residual, mean, rstd:
                        (torch.zeros_like(x), partials, partials))
    f, a = _film_inputs(), _inputs()
    _, dgamma, dbeta = torch.ops.camtl.cuda_film_bwd(torch.randn(B, L, D), f["x"], f["gamma"], f["index"])
    assert calls == [2] and dgamma.eq(7).all() and dbeta.eq(7).all()
    grads = torch.ops.camtl.cuda_conditional_layer_norm_bwd(a["x"], a["x"], a["weight"], a["gamma"], a["beta"],
                                                            a["index"], None, a["x"][..., 0], a["x"][..., 0])
    assert calls == [2, 1] and grads[4].eq(7).all()  # dbeta: the (faked) per-task sum
