"""Input checks shared by the ops: each error names the op, the argument and what was expected."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional, Sequence, Tuple

import torch

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def tensor(op: str, name: str, t, ranks: Sequence[int], layout: str) -> None:
    """t is a floating tensor whose rank is in ``ranks``; ``layout`` names its dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() not in ranks:
        raise ValueError(
            f"{op}: argument '{name}' must have shape {layout} (rank {' or '.join(map(str, ranks))}), "
            f"got rank {t.dim()} with shape {shape_str(t.shape)}"
        )
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: argument '{name}' must be float64, float32, float16 or bfloat16, got {t.dtype}")


def dim(op: str, name: str, t: torch.Tensor, axis: int, expected: int, meaning: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(
            f"{op}: argument '{name}' has size {t.shape[axis]} in dim {axis}, expected {expected} ({meaning}); "
            f"its shape is {shape_str(t.shape)}"
        )


def like(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """t has the same dtype and device as ``ref``."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype} but '{ref_name}' has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}; they must match")


def index(op: str, name: str, idx: Optional[torch.Tensor], batch: int, rows: int, device: torch.device,
          rows_name: str = "G") -> None:
    """idx is None (then batch == rows) or an integer tensor [batch] with values in [0, rows)."""
    if idx is None:
        if batch != rows:
            raise ValueError(
                f"{op}: without '{name}', the table must have one row per example: {rows_name}={rows} "
                f"but the batch has {batch} examples"
            )
        return
    if not isinstance(idx, torch.Tensor) or idx.dtype not in _INDEX_DTYPES:
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{op}: argument '{name}' must be an int64 or int32 tensor of shape [B], got {got}")
    if idx.dim() != 1 or idx.shape[0] != batch:
        raise ValueError(f"{op}: argument '{name}' must have shape [B]=[{batch}], got {shape_str(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{op}: argument '{name}' is on {idx.device} but the inputs are on {device}")
    if batch and torch.compiler.is_compiling():  # no host sync inside a graph: check on the device
        torch._assert_async(((idx >= 0) & (idx < rows)).all(),
                            f"{op}: argument '{name}' holds task ids out of range [0, {rows})")
    elif batch:
        lo, hi = index_range(idx)
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"{op}: argument '{name}' holds {bad}, out of range: task ids must be in [0, {rows}) "
                f"({rows_name}={rows} table rows)"
            )


# .ranges: id(index tensor) -> (the tensor, None or (its version counter, min, max)), inside index_read_once
_READ_RANGES = threading.local()


@contextlib.contextmanager
def index_read_once(idx: Optional[torch.Tensor]):
    """Inside, the ops read ``idx``'s range once (one host sync on a GPU) instead of once per op.

    For a model's forward, which passes one task-id tensor to every op and does not change it. Outside
    the block every op reads again, so a tensor changed between forwards is always checked afresh; one
    changed in place inside the block (a hook) bumps its version counter and is read again too.
    """
    # Compiling: the ops check on the device. Asked first, as torch 2.11's dynamo cannot trace the thread-local.
    if idx is None or torch.compiler.is_compiling():
        yield
        return
    ranges = _READ_RANGES.__dict__.setdefault("ranges", {})
    # Inference tensors have no version counter: they are read by every op.
    if id(idx) in ranges or idx.is_inference():
        yield
        return
    ranges[id(idx)] = (idx, None)  # read on first use: an op that does not need it costs nothing
    try:
        yield
    finally:
        del ranges[id(idx)]


def _read_range(idx: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of idx from one host copy of it: a task-id tensor is small (B or S ids), and one device->host
    copy is one sync and no kernel (aminmax, then reading two scalars, was one kernel and two syncs)."""
    host = idx.to("cpu", copy=True)
    return int(host.min()), int(host.max())


def index_range(idx: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty integer tensor; read once per ``index_read_once`` block."""
    ranges = getattr(_READ_RANGES, "ranges", {})
    held = ranges.get(id(idx))
    held = held if held is not None and held[0] is idx else None
    if held is not None and held[1] is not None and held[1][0] == idx._version:
        return held[1][1], held[1][2]
    lo, hi = _read_range(idx)
    if held is not None:
        ranges[id(idx)] = (idx, (idx._version, lo, hi))
    return lo, hi


def kernel_dtype(t: torch.Tensor) -> Optional[str]:
    """Why the fused kernels cannot take t's dtype (a reference-only reason for ``resolve``), or None."""
    if t.dtype == torch.float64:
        return "the fused kernels take float32, float16 and bfloat16, not float64"
    return None


def autocast_inputs(policy: str, *tensors):
    """Under torch.autocast, casts the op's floating inputs the way autocast casts its own ops; else no-op.

    policy: "lower" (GEMM-like: to the autocast dtype), "fp32" (normalization: to float32) or
    "promote" (elementwise: to the widest input dtype). None entries pass through.
    Outside autocast the inputs are returned unchanged, and the dtype checks stay strict.
    """
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats or not torch.is_autocast_enabled(floats[0].device.type):
        return tensors
    if policy == "lower":
        dtype = torch.get_autocast_dtype(floats[0].device.type)
    elif policy == "fp32":
        dtype = torch.float32
    else:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats))
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def refuse_double_backward(backward_op, op: str, backend: str = "triton") -> None:
    """Gives a kernel's backward op (a torch.library custom op) an autograd formula that raises a clear error.

    Without one, a gradient of a gradient through it fails with torch's "no autograd formula" message.
    """
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward (differentiating a gradient, e.g. after backward(create_graph=True)) is "
            f"supported on the torch backend only, and this gradient came from the {backend} backend; "
            f"run the op under camtl.use_backend('torch') (or CAMTL_BACKEND=torch)"
        )

    def setup_context(ctx, inputs, output):
        pass

    backward_op.register_autograd(backward, setup_context=setup_context)
