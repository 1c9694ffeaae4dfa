"""Launch helpers shared by the kernel files: interpreter flags, dot precision, reduction grids."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional, Tuple

import numpy
import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    _check_interpreter(triton.__version__, numpy.__version__)
    return True


@functools.lru_cache(maxsize=None)
def _check_interpreter(triton_version: str, numpy_version: str) -> None:
    """Triton's interpreter before 3.7 reads a loop bound loaded from memory with int() of a 1-element array, which
    numpy 2.4 refuses: the kernels would fail mid-launch with numpy's "only 0-dimensional arrays" TypeError."""
    def major_minor(version):
        return tuple(int(part) for part in version.split(".")[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        raise RuntimeError(f"TRITON_INTERPRET=1: triton {triton_version}'s interpreter cannot run camtl's kernels "
                           f"with numpy {numpy_version} (triton 3.7 fixed it): pip install 'numpy<2.4', or "
                           f"triton >= 3.7")


# Every launch asks for FMA contraction (a·b + c as one FFMA) itself: the kernels' instruction counts assume it
# (e.g. the scale and the LSE in one FFMA per score). Unset, triton 3.9 warns at the first compile and 3.10 turns
# it off by default.
FP_FUSION = dict(enable_fp_fusion=True)


@triton.jit
def accumulator_zeros(FIRST: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, opaque_zero,
                      WGMMA: tl.constexpr):
    """A [ROWS, COLS] fp32 tile of zeros for a dot's accumulator. With WGMMA (sm_90), each element is its own
    computed value, (FIRST + r·COLS + c)·opaque_zero, so that they need no register copies; else tl.zeros.

    From tl.zeros (one constant splat), LLVM copies the zero into every accumulator register on the path that skips
    a loop (a loop that may run zero times), and may place that block after the loop, before the loop's final wgmma
    wait. ptxas then serializes every wgmma of the kernel (C7515, "non wgmma instructions defining accumulator
    registers ... between start and end of the pipeline stage"): no MMA overlaps another or the softmax. make
    kernel-report shows it (the wgmma_serialized field). Without wgmma (sm_80) the computed zeros only cost
    registers (dQ's yardstick at d32 took 160 instead of 124), hence the flag.

    opaque_zero is 0.0 computed from a kernel argument, which LLVM cannot fold: dropout_p · 0.0 (a float), or
    D · 0.0 (an int). An int argument equal to 1 is specialized into a constant by triton's JIT, and then so is
    the zero: at D = 1 the wgmma would be serialized again (the values stay exact zeros).
    """
    if WGMMA:
        index = FIRST + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
        return index.to(tl.float32) * opaque_zero
    else:
        return tl.zeros([ROWS, COLS], tl.float32)


def has_wgmma(capability: Optional[Tuple[int, int]]) -> bool:
    """Whether a GPU of this (major, minor) capability runs tl.dot on wgmma (sm_90); None: the interpreter."""
    return capability is not None and capability[0] == 9


def dot_flags(dtype: torch.dtype):
    """(UPCAST, PRECISION) for ``tl.dot`` on operands of ``dtype``.

    On a GPU, fp32 operands multiply on TF32 tensor cores ("tf32"), never on plain FMAs ("ieee": no
    tensor cores, kilobytes of spills); the dispatcher sends float32 CUDA inputs to these kernels only
    when torch allows TF32 (camtl.backends.TENSOR_CORE_OPS; the launches check it with require_tf32).
    16-bit operands take the default (tensor cores).
    Under the interpreter (CPU tests) fp32 products are exact ("ieee"), so the kernels match the torch
    reference to fp32 tolerances, and bf16 operands are upcast: the interpreter's bf16 dot is wrong.
    """
    if interpreting():
        upcast = dtype == torch.bfloat16
        return upcast, ("ieee" if (dtype == torch.float32 or upcast) else None)
    return False, ("tf32" if dtype == torch.float32 else None)


def require_tf32(dtype: torch.dtype, device: torch.device, op: str) -> None:
    """Raises BackendUnavailableError if a float32 CUDA launch would use TF32 where torch does not allow it.

    The dispatcher never sends such inputs here (camtl.backends.resolve); this guards direct calls.
    """
    from camtl.backends import BackendUnavailableError, float32_tensor_core_problem

    problem = float32_tensor_core_problem(op, device.type, dtype)
    if problem is not None:
        raise BackendUnavailableError(f"the Triton kernel of {op!r} cannot take float32 CUDA inputs: {problem}")


# (compute capability, SM count) of the GPU that launches on meta tensors stand for; see simulated_gpu.
_SIMULATED_GPU: contextvars.ContextVar[Optional[Tuple[Tuple[int, int], int]]] = contextvars.ContextVar(
    "camtl_simulated_gpu", default=None)


@contextlib.contextmanager
def simulated_gpu(capability: Tuple[int, int], sm_count: int) -> Iterator[None]:
    """Inside the block, launches on meta tensors size their grids and pick configurations as on this GPU.

    For tools that record launches without a GPU (scripts/kernel_report.py), so that they record
    what an sm_80 or sm_90 device would launch, e.g. ``simulated_gpu((9, 0), 132)`` for an H100 SXM.
    """
    if len(capability) != 2 or sm_count < 1:
        raise ValueError(f"simulated_gpu: capability must be (major, minor) and sm_count >= 1, "
                         f"got {capability!r}, {sm_count!r}")
    token = _SIMULATED_GPU.set((tuple(capability), int(sm_count)))
    try:
        yield
    finally:
        _SIMULATED_GPU.reset(token)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def gpu_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The compute capability launches on ``device`` run on: a CUDA device's, the simulated GPU's for meta
    tensors inside ``simulated_gpu``, else None (CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(_cuda_index(device))
    simulated = _SIMULATED_GPU.get()
    return simulated[0] if device.type == "meta" and simulated is not None else None


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should have: about a wave on a GPU, a handful under the interpreter.

    Each program adds a row of partials (read again by the second stage), so
    more programs than the device runs at once only add traffic.
    """
    simulated = _SIMULATED_GPU.get()
    if device.type == "meta" and simulated is not None:
        return 2 * simulated[1]
    if device.type != "cuda":
        return 8
    return 2 * _sm_count(_cuda_index(device))


def rows_per_chunk(rows: int, programs_per_chunk: int, block_m: int, device: torch.device) -> int:
    """Splits each example's ``rows`` rows into chunks of whole BLOCK_M tiles.

    ``programs_per_chunk`` programs reduce each chunk (one per example, times
    the column blocks if D is tiled too), so programs_per_chunk × chunks
    should be about ``target_programs``: enough to fill the device, few
    enough that the per-chunk partials stay small next to the rows they sum.
    """
    tiles = triton.cdiv(rows, block_m)
    wanted = triton.cdiv(target_programs(device), max(programs_per_chunk, 1))
    return block_m * triton.cdiv(tiles, max(1, min(wanted, tiles)))
