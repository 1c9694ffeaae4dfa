"""The ``cuda`` backend: checked wrappers around the CUDA extension ``camtl._C``.

camtl._C is torch-free: it takes ``data_ptr()`` integers, sizes, row strides
and the current stream's handle. So every tensor is checked here first
(device, dtype, layout, shape, index range): the kernels trust what they get.
camtl/ops/layer_norm.py wires the launch functions here into torch.library
ops (camtl::cuda_conditional_layer_norm_fwd / _bwd) exactly as it wires the
Triton ones: autograd, fake implementations, and the same deterministic
per-task sum of the backward's partials. Importing this module does not
import camtl._C; the first launch does.
"""

from __future__ import annotations

import functools
import torch

from camtl.ops import _checks

OP = "camtl.ops.conditional_layer_norm (cuda backend)"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_D = 8192  # the widest row camtl._C takes (csrc/layer_norm.h kMaxD: 512 threads x 16 registers)


@functools.lru_cache(maxsize=None)
def extension():
    """camtl._C, or ImportError saying why it is not there."""
    try:
        import camtl._C as ext
    except ImportError as exc:
        raise ImportError(f"the CUDA extension camtl._C is not built ({exc}); reinstall camtl on a machine with "
                          "nvcc, without CAMTL_SKIP_CUDA_BUILD=1") from exc
    return ext


def extension_info() -> dict:
    """What `camtl info` reports: the compiled archs, the CUDA runtime linked, and the device query's answer."""
    ext = extension()
    status, count, message = ext.device_count()
    return dict(archs=ext.ARCHS, runtime=ext.runtime_version(), device_status=status, device_count=count,
                device_message=message)


# ---- checks -----------------------------------------------------------------------------------------------------

def _shape(shape) -> str:
    return _checks.shape_str(tuple(shape))


def _check(name: str, t, device: torch.device, dtype: torch.dtype, shape) -> None:
    """t is a tensor on `device` with `dtype` and `shape`, or a ValueError/TypeError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{OP}: argument '{name}' must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{OP}: argument '{name}' must be on {device} (the device of x), got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{OP}: argument '{name}' must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{OP}: argument '{name}' must have shape {_shape(shape)}, got {_shape(t.shape)}")


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: argument 'x' must be a tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"{OP}: argument 'x' must be a CUDA tensor, got one on {x.device}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{OP}: argument 'x' must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{OP}: argument 'x' must have shape [B, *, D], got {_shape(x.shape)}")
    D = x.shape[-1]
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{OP}: argument 'x' must have 1 <= D <= {MAX_D} features (its last dim), "
                         f"got shape {_shape(x.shape)}")
    if x.numel() // D >= 2 ** 31:
        raise ValueError(f"{OP}: argument 'x' must have fewer than 2^31 rows, got {x.numel() // D}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [M, D] rows with a unit last stride: a view when one exists (its row stride goes to the kernel)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _table(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[-1]


def _check_params(x, weight, gamma, beta, index, residual, bias=None) -> None:
    D = x.shape[-1]
    _check("weight", weight, x.device, x.dtype, (D,))
    if bias is not None:
        _check("bias", bias, x.device, x.dtype, (D,))
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 2:
        raise ValueError(f"{OP}: argument 'gamma' must be a tensor of shape [G, D]=[G, {D}], got "
                         f"{_shape(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__}")
    _check("gamma", gamma, x.device, x.dtype, (gamma.shape[0], D))
    _check("beta", beta, x.device, x.dtype, gamma.shape)
    if residual is not None:
        _check("residual", residual, x.device, x.dtype, x.shape)
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"{OP}: argument 'index' must be an int64 tensor of shape [B], got {got}")
    _checks.index(OP, "index", index, x.shape[0], gamma.shape[0], x.device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _chunk_rows(R: int, B: int, device: torch.device) -> int:
    """Rows of one example per backward block: about two blocks per SM over the batch (as the Triton backward)."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = max(1, min(R, -(-target // max(B, 1))))
    return -(-R // chunks)


# ---- launchers (the contracts of camtl.kernels.layer_norm's) -------------------------------------------------------

def layer_norm_forward(x, weight, bias, gamma, beta, index, residual, eps):
    """Returns y (x's shape and dtype), mean and rstd (x.shape[:-1], fp32)."""
    _check_x(x)
    _check_params(x, weight, gamma, beta, index, residual, bias)
    if not eps > 0:
        raise ValueError(f"{OP}: argument 'eps' must be > 0, got {eps}")
    D, B = x.shape[-1], x.shape[0]
    x2 = _rows(x)
    M = x2.shape[0]
    y = torch.empty((M, D), dtype=x.dtype, device=x.device)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        res2 = _rows(residual) if residual is not None else None
        weight, bias, gamma, beta = weight.contiguous(), bias.contiguous(), _table(gamma), _table(beta)
        index = index.contiguous()
        with torch.cuda.device(x.device):
            extension().cln_forward(
                DTYPE_CODES[x.dtype], x2.data_ptr(), _row_stride(x2),
                res2.data_ptr() if res2 is not None else 0, _row_stride(res2) if res2 is not None else 0,
                weight.data_ptr(), bias.data_ptr(), gamma.data_ptr(), _row_stride(gamma), beta.data_ptr(),
                _row_stride(beta), index.data_ptr(), y.data_ptr(), D, mean.data_ptr(), rstd.data_ptr(),
                M, B, D, float(eps), _stream(x.device))
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def layer_norm_backward(dy, x, weight, gamma, beta, index, residual, mean, rstd):
    """Returns dx (x's shape and dtype; also d(residual)) and the fp32 partials dscale, dbias [B, chunks, D]."""
    _check_x(x)
    _check_params(x, weight, gamma, beta, index, residual)
    _check("dy", dy, x.device, x.dtype, x.shape)
    for name, t in (("mean", mean), ("rstd", rstd)):
        _check(name, t, x.device, torch.float32, x.shape[:-1])
    D, B = x.shape[-1], x.shape[0]
    x2 = _rows(x)
    M = x2.shape[0]
    R = M // B if B else 0
    chunk_rows = _chunk_rows(R, B, x.device) if R else 1
    chunks = -(-R // chunk_rows) if R else 0
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    dscale = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    dbias = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    if M:
        dy2 = _rows(dy)
        res2 = _rows(residual) if residual is not None else None
        weight, gamma, beta, index = weight.contiguous(), _table(gamma), _table(beta), index.contiguous()
        mean, rstd = mean.contiguous(), rstd.contiguous()
        with torch.cuda.device(x.device):
            extension().cln_backward(
                DTYPE_CODES[x.dtype], dy2.data_ptr(), _row_stride(dy2), x2.data_ptr(), _row_stride(x2),
                res2.data_ptr() if res2 is not None else 0, _row_stride(res2) if res2 is not None else 0,
                weight.data_ptr(), gamma.data_ptr(), _row_stride(gamma), beta.data_ptr(), _row_stride(beta),
                index.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), D, dscale.data_ptr(),
                dbias.data_ptr(), M, B, chunk_rows, chunks, D, _stream(x.device))
    return dx.view(x.shape), dscale, dbias
