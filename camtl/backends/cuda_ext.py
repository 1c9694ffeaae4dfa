"""The ``cuda`` backend: checked wrappers around the CUDA extension ``camtl._C``.

camtl._C is torch-free: it takes ``data_ptr()`` integers, sizes, row strides
and the current stream's handle. So every tensor is checked here first
(device, dtype, layout, shape, index range): the kernels trust what they get.
camtl/ops/layer_norm.py and camtl/ops/film.py wire the launch functions here
into torch.library ops (camtl::cuda_conditional_layer_norm_fwd / _bwd,
camtl::cuda_film_fwd / _bwd) exactly as they wire the Triton ones: autograd,
fake implementations. The backwards' partials are summed per task by
camtl._C's deterministic ``task_sum`` (:func:`per_task_sum`; fixed order, fp64,
no atomics) instead of the torch path's one-hot GEMM. Importing this module
does not import camtl._C; the first launch does.
"""

from __future__ import annotations

import functools
import torch

from camtl.ops import _checks

OP = "camtl.ops.conditional_layer_norm (cuda backend)"
FILM_OP = "camtl.ops.film (cuda backend)"
REDUCE_OP = "camtl.ops._reduce.per_task_sum (cuda backend)"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_D = 8192  # the widest row camtl._C takes (csrc/layer_norm.h kMaxD: 512 threads x 16 registers)
# The device type the launches take. tests/test_csrc_host.py sets "cpu" and swaps extension() for the host
# harness, _on, _stream and _sm_count for CPU stand-ins, so that this module's glue runs without a GPU.
DEVICE_TYPE = "cuda"


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


def _check(name: str, t, device: torch.device, dtype: torch.dtype, shape, op: str = OP) -> None:
    """t is a tensor on `device` with `dtype` and `shape`, or a ValueError/TypeError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be on {device} (the device of x), got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: argument '{name}' must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: argument '{name}' must have shape {_shape(shape)}, got {_shape(t.shape)}")


def _check_x(x, op: str = OP, layout: str = "[B, *, D]", ranks=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: argument 'x' must be a tensor, got {type(x).__name__}")
    if x.device.type != DEVICE_TYPE:
        raise ValueError(f"{op}: argument 'x' must be a CUDA tensor, got one on {x.device}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: argument 'x' must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2 or (ranks is not None and x.dim() not in ranks):
        raise ValueError(f"{op}: argument 'x' must have shape {layout}, got {_shape(x.shape)}")
    D = x.shape[-1]
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{op}: argument 'x' must have 1 <= D <= {MAX_D} features (its last dim), "
                         f"got shape {_shape(x.shape)}")
    if x.numel() // D >= 2 ** 31:
        raise ValueError(f"{op}: argument 'x' must have fewer than 2^31 rows, got {x.numel() // D}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [M, D] rows with a unit last stride: a view when one exists (its row stride goes to the kernel)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _table(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[-1]


def _check_index(index, batch: int, tasks: int, device: torch.device, op: str = OP) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"{op}: argument 'index' must be an int64 tensor of shape [B], got {got}")
    _checks.index(op, "index", index, batch, tasks, device)


def _check_table(name: str, t, x, op: str) -> None:
    """t is a [G, D] table like x (D = x's last dim)."""
    D = x.shape[-1]
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{op}: argument '{name}' must be a tensor of shape [G, D]=[G, {D}], got "
                         f"{_shape(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    _check(name, t, x.device, x.dtype, (t.shape[0], D), op)


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
    _check_index(index, x.shape[0], gamma.shape[0], x.device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """The context a launch runs in: its device current (the stream and the launch follow it)."""
    return torch.cuda.device(device)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_rows(R: int, B: int, device: torch.device) -> int:
    """Rows of one example per backward block: about two blocks per SM over the batch (as the Triton backward)."""
    target = 2 * _sm_count(device)
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
        with _on(x.device):
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
        with _on(x.device):
            extension().cln_backward(
                DTYPE_CODES[x.dtype], dy2.data_ptr(), _row_stride(dy2), x2.data_ptr(), _row_stride(x2),
                res2.data_ptr() if res2 is not None else 0, _row_stride(res2) if res2 is not None else 0,
                weight.data_ptr(), gamma.data_ptr(), _row_stride(gamma), beta.data_ptr(), _row_stride(beta),
                index.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), D, dscale.data_ptr(),
                dbias.data_ptr(), M, B, chunk_rows, chunks, D, _stream(x.device))
    return dx.view(x.shape), dscale, dbias


# ---- FiLM (the contracts of camtl.kernels.film's) ------------------------------------------------------------------

def _check_film(x, gamma, index) -> int:
    """Checks x ([B, L, D] or [L, D] shared, on CUDA), gamma ([G, D] like x) and index (int64 [B]); returns B."""
    _check_x(x, FILM_OP, "[B, L, D] or [L, D]", (2, 3))
    return _check_film_params(x, gamma, index)


def _check_film_params(x, gamma, index) -> int:
    """_check_film past x's device, dtype and rank (so that it runs on any device)."""
    _check_table("gamma", gamma, x, FILM_OP)
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError(f"{FILM_OP}: argument 'index' must be an int64 tensor of shape [B], got "
                         f"{_shape(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__}")
    B = index.shape[0]
    if x.dim() == 3 and x.shape[0] != B:
        raise ValueError(f"{FILM_OP}: argument 'index' must have shape [B]=[{x.shape[0]}], got {_shape(index.shape)}")
    if B * x.shape[-2] >= 2 ** 31:
        raise ValueError(f"{FILM_OP}: B·L = {B * x.shape[-2]} rows, must be fewer than 2^31")
    _check_index(index, B, gamma.shape[0], x.device, FILM_OP)
    return B


def _film_chunk_rows(L: int, B: int, D: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of one example per backward block: about two blocks per SM over the batch and D's tiles."""
    vec = 16 // dtype.itemsize
    units = -(-D // vec)
    tiles = -(-units // 256)  # film::kThreads units per tile (aligned rows; only a sizing estimate)
    target = 2 * _sm_count(device)
    chunks = max(1, min(L, -(-target // max(B * tiles, 1))))
    return -(-L // chunks)


def film_forward(x, gamma, beta, index):
    """out [B, L, D] in x's dtype; x is [B, L, D], or [L, D] shared by the B = len(index) examples."""
    B = _check_film(x, gamma, index)
    _check_table("beta", beta, x, FILM_OP)
    if beta.shape != gamma.shape:
        raise ValueError(f"{FILM_OP}: argument 'beta' must have shape {_shape(gamma.shape)}, got "
                         f"{_shape(beta.shape)}")
    L, D = x.shape[-2], x.shape[-1]
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    if B and L:
        x2 = _rows(x)
        gamma, beta, index = _table(gamma), _table(beta), index.contiguous()
        with _on(x.device):
            extension().film_forward(
                DTYPE_CODES[x.dtype], x2.data_ptr(), _row_stride(x2), gamma.data_ptr(), _row_stride(gamma),
                beta.data_ptr(), _row_stride(beta), index.data_ptr(), out.data_ptr(), D, B, L, D, x.dim() == 2,
                _stream(x.device))
    return out


def film_backward(dy, x, gamma, index):
    """dx (x's shape and dtype; summed over the batch for a shared x) and the fp32 partials dscale, dshift
    [B, chunks, D]: Σ dy∘x and Σ dy over chunks of each example's rows (of FILM_SHARED_ROWS rows for a shared x)."""
    B = _check_film(x, gamma, index)
    L, D = x.shape[-2], x.shape[-1]
    _check("dy", dy, x.device, x.dtype, (B, L, D), FILM_OP)
    shared = x.dim() == 2
    if L == 0:
        chunk_rows, chunks = 1, 0
    elif shared:
        chunk_rows = extension().FILM_SHARED_ROWS
        chunks = -(-L // chunk_rows)
    else:
        chunk_rows = _film_chunk_rows(L, B, D, x.dtype, x.device) if B else L
        chunks = -(-L // chunk_rows)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dscale = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    dshift = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    if L and (B or shared):  # a shared x with B = 0 gets dx = 0 (an empty sum) from the kernel
        x2, dy2, dx2 = _rows(x), _rows(dy), dx.view(-1, D)
        gamma, index = _table(gamma), index.contiguous()
        with _on(x.device):
            extension().film_backward(
                DTYPE_CODES[x.dtype], dy2.data_ptr() if B else 0, _row_stride(dy2) if B else D, x2.data_ptr(),
                _row_stride(x2), gamma.data_ptr(), _row_stride(gamma), index.data_ptr() if B else 0,
                dx2.data_ptr(), D, dscale.data_ptr() if B else 0, dshift.data_ptr() if B else 0, B, L, chunk_rows,
                chunks, D, shared, _stream(x.device))
    return dx, dscale, dshift


# ---- the deterministic per-task sum --------------------------------------------------------------------------------

def per_task_sums(partials, index, num_tasks: int):
    """[per_task_sum(p, index, num_tasks) for p in partials] for one or two fp32 [B, P, *F] arrays of one shape,
    in one launch of camtl._C.task_sum: out[g] = Σ_{b: index[b] = g} Σ_p p[b, p], added in a fixed order in fp64
    and rounded once to fp32 (bitwise repeatable; a task absent from the batch gets exact zeros)."""
    if not 1 <= len(partials) <= 2:
        raise ValueError(f"{REDUCE_OP}: takes one or two partial arrays, got {len(partials)}")
    first = partials[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        raise ValueError(f"{REDUCE_OP}: argument 'partials' must be a tensor of shape [B, P, *F], got "
                         f"{_shape(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}")
    if first.device.type != DEVICE_TYPE:
        raise ValueError(f"{REDUCE_OP}: argument 'partials' must be a CUDA tensor, got one on {first.device}")
    for p in partials:
        _check("partials", p, first.device, torch.float32, first.shape, REDUCE_OP)
    if not (isinstance(num_tasks, int) and num_tasks >= 0):
        raise ValueError(f"{REDUCE_OP}: argument 'num_tasks' must be an int >= 0, got {num_tasks!r}")
    B, P = first.shape[:2]
    features = tuple(first.shape[2:])
    _check_index(index, B, num_tasks, first.device, REDUCE_OP)
    F = 1
    for f in features:
        F *= f
    outs = [torch.empty((num_tasks, *features), dtype=torch.float32, device=first.device) for _ in partials]
    if num_tasks and F:
        flat = [p.contiguous() for p in partials]
        index = index.contiguous()
        pointers = [t.data_ptr() if B * P else 0 for t in flat] + [0] * (2 - len(flat))
        out_pointers = [t.data_ptr() for t in outs] + [0] * (2 - len(outs))
        with _on(first.device):
            extension().task_sum(pointers[0], out_pointers[0], pointers[1], out_pointers[1],
                                 index.data_ptr() if B else 0, B, P, F, num_tasks, _stream(first.device))
    return outs


def per_task_sum(partials, index, num_tasks: int):
    """camtl.ops._reduce.per_task_sum's contract, on camtl._C (see per_task_sums)."""
    return per_task_sums([partials], index, num_tasks)[0]
