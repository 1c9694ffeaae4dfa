"""Launch helpers shared by the kernel files: interpreter flags, dot precision, reduction grids."""

from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_flags(dtype: torch.dtype):
    """(UPCAST, PRECISION) for ``tl.dot`` on operands of ``dtype``.

    The interpreter's bf16 dot is wrong, so bf16 operands are upcast there.
    fp32 operands get exact products (no TF32); 16-bit ones the default.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if (dtype == torch.float32 or upcast) else None
    return upcast, precision


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should have: about a wave on a GPU, a handful under the interpreter.

    Each program adds a row of partials (read again by the second stage), so
    more programs than the device runs at once only add traffic.
    """
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(index)


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
