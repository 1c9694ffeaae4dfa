#!/usr/bin/env python
"""make kernel-report: what every shipped Triton kernel configuration compiles to, read without a GPU.

For sm_90a and sm_80 it compiles each kernel configuration the dispatcher
can choose (fp16/bf16; attention at head dims 32/64/128, dropout on/off,
with/without key padding, and packed: the varlen kernels attention_*_varlen,
dropout on/off; the norm, FiLM and adapter kernels at D 768/1024),
plus a yardstick: the attention kernels with the conditional bias, the key
padding and dropout compiled out (plain flash attention), in bf16 only (fp16's
were the same in every row, to the instruction); and a padded batch of odd
length (ODD_SEQ_LEN, bf16, d 64, sm_90a: variant "L=100"). Each row gives
registers and spills (triton's own ptxas -v log), shared memory, the thread
blocks resident per SM that these allow (blocks_per_sm, as the CUDA occupancy
calculator counts them: registers, shared memory, warps), the tensor
core instruction (HGMMA = wgmma, HMMA = mma.sync), whether ptxas serialized
the kernel's wgmma (wgmma_serialized: the code and reason of the log's
"Potential Performance Loss" line, e.g. C7515, or null; each wgmma then
waits for the one before, so no MMA overlaps another or the softmax), the
size of the main loop in SASS, per thread and per score (loop_instructions_per_score, the
attention kernels: the loop's instructions times the block's threads over the
tile's BLOCK_M x BLOCK_N scores, which compares tiles with different warp
counts; per thread, more warps always look cheaper, even when they repeat
work), and the loop's tensor-core instructions (loop_wgmma, loop_mma_sync:
tensor_core_op names the best one in the whole kernel, and a loop may mix
them). Output: kernel-report.json in --out (default
$KERNEL_REPORT_OUT or .benchmarks/kernel-report/) and a table on stdout.

How configurations are found: the kernel files' own launch functions
(attention_forward, layer_norm_backward, ...) are called on meta tensors with
each Triton kernel swapped for a recorder, so the report compiles exactly the
arguments, block sizes and flags that a launch would pass (inside
simulated_gpu: an H100 SXM for sm_90a, an A100 for sm_80, so each arch gets
the tiles, warps and grids chosen for it), and follows the
kernel files when they change. The recorded launch goes through Triton's own
JIT argument specialization (pointer and stride divisibility, strides of 1)
and triton.compile for a GPUTarget: no GPU, no TRITON_INTERPRET.

loop_instructions: SASS instructions (NOPs excluded) per thread in the main
loop body, i.e. the span from a backward branch's target to the branch (a BRA
to a lower address). Spans under MIN_LOOP_INSTRUCTIONS instructions are waits
(mbarrier try-wait and the like), not loops. Of the remaining spans the
innermost ones (containing no other) are kept, and the largest of those is the
hot loop (today every looping kernel has exactly one: attention over key
tiles, or query tiles in dK/dV; layer norm and FiLM backward over row tiles;
the adapter GEMM over K). It includes every branch of an `if` inside the loop
(e.g. the bias gather, taken on diagonal tiles only). A kernel with no loop
(layer_norm_fwd, film_fwd: one tile per program) reports its whole body, and
loop "none". Identical binaries (layer norm at D 768 and 1024 both use BLOCK_D
1024) are compiled once and reported on each row.

Cache: each compiled kernel's figures are kept in <out>/cache/, keyed by the
launch (arguments, constexprs, options, arch), the kernel's source and the
sources of the functions it calls (triton's own cache_key), the triton
version, the ptxas/nvdisasm binaries and this script. A rerun compiles only
what changed (edit one kernel: only its configurations); --no-cache compiles
everything again. The longest compiles are queued first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional

ARCHS = {"sm_90a": 90, "sm_80": 80, "sm_86": 86}
NVDISASM_ARCHS = {"sm_90a": "SM90a", "sm_80": "SM80", "sm_86": "SM86"}
DEFAULT_ARCHS = ("sm_90a", "sm_80")  # sm_86 (99 KB of shared memory per block) on request: --arch sm_86
# The GPU each arch's launches are recorded for: (compute capability, SM count) of an H100 SXM, an A100, an A10.
SIMULATED_GPUS = {"sm_90a": ((9, 0), 132), "sm_80": ((8, 0), 108), "sm_86": ((8, 6), 72)}
# Per SM: registers, resident warps and blocks, shared memory in bytes, and the shared memory the driver reserves
# for each block (CUDA C++ Programming Guide, technical specifications per compute capability).
SM_LIMITS = {"sm_90a": dict(regs=65536, warps=64, blocks=32, smem=228 * 1024, smem_reserved=1024),
             "sm_80": dict(regs=65536, warps=64, blocks=32, smem=164 * 1024, smem_reserved=1024),
             "sm_86": dict(regs=65536, warps=48, blocks=16, smem=100 * 1024, smem_reserved=1024)}
DTYPES = ("fp16", "bf16")  # the default; fp32 (TF32 on the tensor cores) on demand: --dtype fp32
DTYPE_CHOICES = DTYPES + ("fp32",)
HEAD_DIMS = (32, 64, 128)
HIDDEN_SIZES = (768, 1024)
# A BERT-base-like batch: L = max_seq_length = 128, H = hidden / d heads, block width c = ceil(L / (hidden // L)).
BATCH, SEQ_LEN = 8, 128
# A padded batch whose length is no multiple of a tile or of 16: the partial last tiles and their masks, and the
# bias rows' padded stride. Compiled for one (arch, dtype, head dim) only, as the yardstick for one dtype (fp16's
# figures were bf16's in every row), to keep the report within its 5 minutes on a busy machine.
ODD_SEQ_LEN, ODD_SEQ_LEN_CONFIG = 100, ("sm_90a", "bf16", 64)
YARDSTICK_DTYPE = "bf16"
MIN_LOOP_INSTRUCTIONS = 24
TENSOR_CORE_OPS = ("wgmma", "mma.sync", "none")
FIELDS = ("kernel", "arch", "dtype", "head_dim", "block_m", "block_n", "num_warps", "num_stages", "dropout", "regs",
          "spill_bytes", "smem_bytes", "blocks_per_sm", "tensor_core_op", "wgmma_serialized", "loop_instructions",
          "loop_instructions_per_score", "loop_wgmma", "loop_mma_sync", "yardstick")
# The kernels whose main loop covers a [BLOCK_M, BLOCK_N] tile of attention scores per iteration.
SCORE_TILE_KERNELS = ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv", "attention_fwd_varlen",
                      "attention_bwd_dq_varlen", "attention_bwd_dkdv_varlen")

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")  # nvdisasm: a branch target's label, on the line before it
_LABEL_REF = re.compile(r"`\((\.L_x_\d+)\)")
# Instructions whose last operand is a code address (a branch, a call, a convergence barrier's target).
_CODE_TARGET = re.compile(
    r"^(?:@!?U?P[T0-9]+\s+)?(?:BRA|BSSY|CALL|JMP|SSY|PBK|PCNT)(?:\.[A-Z.]+)?\s.*?(0x[0-9a-f]+)\s*$", re.IGNORECASE)


# ---- SASS reading ---------------------------------------------------------------------------------------------

def parse_sass(sass: str) -> List[tuple]:
    """[(address, instruction text)] of one kernel's SASS, in address order: cuobjdump -sass output, or nvdisasm's,
    whose branch targets are labels (written back as the addresses cuobjdump prints)."""
    out, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            address = int(m.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            out.append((address, m.group(2).strip()))
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
    if labels:
        def address(ref):
            return hex(labels[ref.group(1)]) if ref.group(1) in labels else ref.group(0)
        out = [(addr, _LABEL_REF.sub(address, text)) for addr, text in out]
    return out


def find_loops(instructions: List[tuple]) -> List[tuple]:
    """(start, end) address spans of the loops: a BRA to a strictly lower address, and its target."""
    loops = []
    for addr, text in instructions:
        m = _CODE_TARGET.match(text)
        if m and _opcode(text) == "BRA" and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return loops


def _count(instructions: List[tuple], start: int, end: int) -> int:
    return sum(1 for addr, text in instructions if start <= addr <= end and not text.startswith("NOP"))


def _opcode(text: str) -> str:
    """An instruction's opcode without its modifiers or predicate: "@P0 HGMMA.64x64x16.F32 ..." -> "HGMMA"."""
    return text.split()[1 if text.startswith("@") else 0].split(".")[0]


def _mma_counts(instructions: List[tuple], start: int, end: int) -> Dict[str, int]:
    """The tensor-core instructions in [start, end]: {"wgmma": HGMMA count, "mma.sync": HMMA count}."""
    opcodes = [_opcode(text) for addr, text in instructions if start <= addr <= end]
    return {"wgmma": opcodes.count("HGMMA"), "mma.sync": opcodes.count("HMMA")}


def main_loop(sass: str) -> Dict[str, object]:
    """The hot loop of one kernel's SASS: its instruction count, the spans found, and how it was chosen.

    Returns {"instructions": n, "loop": "innermost of k" | "none", "loops": k, "inner": [...], "mma": {...}}: n is
    the largest innermost loop, inner every innermost loop's count in address order (the attention loops before the
    band, on it and after it), mma its tensor-core instructions ({"wgmma": HGMMA, "mma.sync": HMMA}). With no
    loop, n and mma count the whole kernel and inner is empty.
    """
    return _main_loop(parse_sass(sass))


def _main_loop(instructions: List[tuple]) -> Dict[str, object]:
    if not instructions:
        raise ValueError("no SASS instructions found (is this nvdisasm or cuobjdump -sass output?)")
    spans = [(s, e, _count(instructions, s, e)) for s, e in find_loops(instructions)]
    spans = [span for span in spans if span[2] >= MIN_LOOP_INSTRUCTIONS]
    if not spans:
        return {"instructions": _count(instructions, 0, instructions[-1][0]), "loop": "none", "loops": 0,
                "inner": [], "mma": _mma_counts(instructions, 0, instructions[-1][0])}
    innermost = [a for a in spans if not any(b is not a and a[0] <= b[0] and b[1] <= a[1] for b in spans)]
    best = max(innermost, key=lambda span: span[2])
    return {"instructions": best[2], "loop": f"innermost of {len(spans)}", "loops": len(spans),
            "inner": [span[2] for span in sorted(innermost)], "mma": _mma_counts(instructions, best[0], best[1])}


def tensor_core_op(sass: str) -> str:
    """wgmma if the kernel issues HGMMA, else mma.sync if it issues HMMA, else none."""
    return _tensor_core_op(parse_sass(sass))


def _tensor_core_op(instructions: List[tuple]) -> str:
    ops = {_opcode(text) for _, text in instructions}
    return "wgmma" if "HGMMA" in ops else "mma.sync" if "HMMA" in ops else "none"


def text_section(cubin: bytes) -> bytes:
    """A kernel's machine code: the one .text.<kernel> section of its cubin (an ELF64 file)."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]  # (name offset, type, flags, address, file offset, size)

    def name(header):
        start = names + header[0]
        return cubin[start:cubin.index(b"\0", start)].decode()

    texts = [cubin[h[4]:h[4] + h[5]] for h in headers if name(h).startswith(".text.")]
    if len(texts) != 1:
        raise ValueError(f"expected one .text section in the cubin, found {len(texts)}")
    return texts[0]


def split_listing(instructions: List[tuple], sizes: List[int]) -> List[List[tuple]]:
    """The listing of kernels laid end to end (sizes in bytes, in order) as one listing per kernel, each from
    address 0: addresses and code targets (branches, calls, BSSY) less the kernel's start."""
    kernels, base = [], 0
    for size in sizes:
        own = []
        for addr, text in instructions:
            if base <= addr < base + size:
                m = _CODE_TARGET.match(text)
                if m:
                    text = text[:m.start(1)] + hex(int(m.group(1), 16) - base) + text[m.end(1):]
                own.append((addr - base, text))
        kernels.append(own)
        base += size
    return kernels


def disassemble(codes: List[bytes], arch: str) -> List[List[tuple]]:
    """Each kernel's [(address, instruction)], from one nvdisasm call on their machine code laid end to end.

    nvdisasm spends about 0.4 s of CPU per call whatever it reads (a kernel's code alone as raw bytes, or its
    cubin), and about 0.04 s per kernel more: one call per batch of kernels, not one per kernel, takes a sixth of
    a full report's CPU time off. Raw code (-b) prints branch targets as addresses; the listing is that of the
    cubin (tests/test_kernel_report.py compares them).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "code.bin"
        path.write_bytes(b"".join(codes))
        sass = subprocess.run([_tool("nvdisasm"), "-b", NVDISASM_ARCHS[arch], "-ndf", str(path)],
                              capture_output=True, text=True, check=True).stdout
    return split_listing(parse_sass(sass), [len(code) for code in codes])


# ptxas's "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..." (C7515 and its kin,
# one code per reason): it then waits for every wgmma of the kernel before issuing the next, so no MMA overlaps
# another or the softmax.
_WGMMA_SERIALIZED = re.compile(
    r"\((C\d+)\)[^\n]*?wgmma\.mma_async instructions are serialized (due to [^'\n]*?)(?: in the function|$)",
    re.MULTILINE)


def parse_ptxas_log(log: str) -> Dict[str, object]:
    """regs, spill_bytes (spill stores), spill_load_bytes and wgmma_serialized (ptxas's code and reason, e.g.
    "C7515: due to ...", or None) from a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise ValueError(f"could not read registers and spills from the ptxas log:\n{log}")
    serialized = _WGMMA_SERIALIZED.search(log)
    return {"regs": int(regs.group(1)), "spill_bytes": int(spill.group(1)), "spill_load_bytes": int(spill.group(2)),
            "wgmma_serialized": f"{serialized.group(1)}: {serialized.group(2).strip()}" if serialized else None}


# ---- configurations: the kernel files' launches, recorded on meta tensors ------------------------------------

class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, name: str, attr: str, launches: list):
        self.name, self.attr, self.launches = name, attr, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.attr, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(module, names: Dict[str, str], launches: list):
    """Swaps module.<attr> for recorders named names[attr] for the duration."""
    saved = {attr: getattr(module, attr) for attr in names}
    try:
        for attr, kernel in names.items():
            setattr(module, attr, _Recorder(kernel, attr, launches))
        yield
    finally:
        for attr, fn in saved.items():
            setattr(module, attr, fn)


def _arg_spec(arg):
    """A picklable stand-in for a launch argument: tensors become ("tensor", dtype name)."""
    import torch

    if isinstance(arg, torch.Tensor):
        return ("tensor", str(arg.dtype).replace("torch.", ""))
    return arg


def collect_configs(archs=DEFAULT_ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, hidden_sizes=HIDDEN_SIZES,
                    kernels: Optional[List[str]] = None) -> List[dict]:
    """Every (kernel, arch, configuration) to compile, as picklable jobs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_report: unset TRITON_INTERPRET: the report compiles for GPUs, the interpreter "
                           "replaces the kernels with Python")
    import torch
    from camtl.kernels import adapter as adapter_k
    from camtl.kernels import attention as attention_k
    from camtl.kernels import film as film_k
    from camtl.kernels import layer_norm as layer_norm_k
    from camtl.kernels._common import simulated_gpu

    meta = torch.device("meta")
    jobs: List[dict] = []

    def add(module, attr_names, call, only_arch=None, **fields):
        for arch in archs:  # each arch's own launches: tiles, warps and grids are chosen per GPU
            if only_arch not in (None, arch):
                continue
            launches: list = []
            with _recording(module, attr_names, launches), simulated_gpu(*SIMULATED_GPUS[arch]):
                call()
            for name, attr, args, kwargs in launches:
                kwargs = dict(kwargs)
                if fields.get("yardstick"):
                    if "HAS_BLOCK_BIAS" not in _arg_names(getattr(module, attr)):
                        continue  # a helper kernel (bias expansion, dropout mask, dtable): no plain-attention twin
                    kwargs["HAS_BLOCK_BIAS"] = False
                jobs.append(dict(kernel=name, module=module.__name__, attr=attr, arch=arch,
                                 args=[_arg_spec(a) for a in args], kwargs=kwargs, **fields))

    def attention_inputs(dt, d, L):
        """(q, k, v, table, index, dense bias) of a BERT-base-like batch of length L, on the meta device."""
        H = max(1, 768 // d)
        C = -(-L // max(1, (H * d) // L))
        q, k, v = (torch.empty((BATCH, H, L, d), dtype=dt, device=meta) for _ in range(3))
        table = torch.empty((3, L, C), dtype=dt, device=meta)
        index = torch.empty((BATCH,), dtype=torch.int64, device=meta)
        bias = torch.empty(attention_k.dense_bias_shape(3, L), dtype=torch.float32, device=meta)
        return q, k, v, table, index, bias

    def padded(dtype, dt, d, L, variants, variant, only_arch=None):
        """The padded attention's launches for a batch of length L, each (dropout, key padding, yardstick)."""
        q, k, v, table, index, bias = attention_inputs(dt, d, L)
        H = q.shape[1]
        lse = torch.empty((BATCH, H, L), dtype=torch.float32, device=meta)
        for dropout, key_padding, yardstick in variants:
            keep = torch.empty((BATCH, L), dtype=torch.bool, device=meta) if key_padding else None
            kb = torch.empty((BATCH, L), dtype=torch.float32, device=meta) if key_padding else None
            p = 0.1 if dropout else 0.0
            fields = dict(dtype=dtype, head_dim=d, hidden_size=None, dropout=dropout, key_padding=key_padding,
                          variant=variant, yardstick=yardstick, only_arch=only_arch)
            add(attention_k, {"_fwd_kernel": "attention_fwd", "_dense_bias_kernel": "attention_bias_expand",
                              "_dropout_mask_kernel": "attention_dropout_mask",
                              "_key_bias_operand_kernel": "attention_key_bias_operand"},
                lambda: attention_k.attention_forward(q, k, v, table, index, keep, d ** -0.5, p, 1234), **fields)
            mask = torch.empty(attention_k.dropout_mask_shape(BATCH * H, L, d, dt, p), dtype=torch.int32,
                               device=meta)
            add(attention_k, {"_bwd_dq_kernel": "attention_bwd_dq", "_bwd_dkdv_kernel": "attention_bwd_dkdv",
                              "_bwd_dtable_kernel": "attention_bwd_dtable"},
                lambda: attention_k.attention_backward(q, q, k, v, q, lse, bias, mask, table, index, kb, d ** -0.5,
                                                       p),
                **fields)

    torch_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    shipped = [(drop, kpad, False) for drop in (False, True) for kpad in (False, True)]
    for dtype in dtypes:
        dt = torch_dtypes[dtype]
        for d in head_dims:
            H = max(1, 768 // d)
            yardstick = [(False, False, True)] if dtype == YARDSTICK_DTYPE or YARDSTICK_DTYPE not in dtypes else []
            padded(dtype, dt, d, SEQ_LEN, shipped + yardstick, "")
            odd_arch, odd_dtype, odd_d = ODD_SEQ_LEN_CONFIG
            if (dtype, d) == (odd_dtype, odd_d):  # the tail tiles and masks, with the padded layout
                padded(dtype, dt, d, ODD_SEQ_LEN, shipped + [(False, False, True)], f"L={ODD_SEQ_LEN}", odd_arch)
            q, k, v, table, index, bias = attention_inputs(dt, d, SEQ_LEN)
            # Packed: the batch's BATCH·SEQ_LEN tokens as BATCH sequences, the longest SEQ_LEN.
            packed = [t.transpose(1, 2).reshape(BATCH * SEQ_LEN, H, d) for t in (q, k, v)]
            cu_seqlens = torch.empty((BATCH + 1,), dtype=torch.int32, device=meta)
            lse_packed = torch.empty((H, BATCH * SEQ_LEN), dtype=torch.float32, device=meta)
            for dropout in (False, True):
                p = 0.1 if dropout else 0.0
                fields = dict(dtype=dtype, head_dim=d, hidden_size=None, dropout=dropout, key_padding=None,
                              variant="varlen", yardstick=False)
                add(attention_k, {"_fwd_kernel": "attention_fwd_varlen", "_dense_bias_kernel": "attention_bias_expand",
                                  "_dropout_mask_kernel": "attention_dropout_mask_varlen"},
                    lambda: attention_k.attention_forward_varlen(*packed, cu_seqlens, SEQ_LEN, table, index,
                                                                 d ** -0.5, p, 1234), **fields)
                mask = torch.empty(attention_k.dropout_mask_shape(BATCH * H, SEQ_LEN, d, dt, p), dtype=torch.int32,
                                   device=meta)
                add(attention_k, {"_bwd_dq_kernel": "attention_bwd_dq_varlen",
                                  "_bwd_dkdv_kernel": "attention_bwd_dkdv_varlen",
                                  "_bwd_dtable_kernel": "attention_bwd_dtable_varlen"},
                    lambda: attention_k.attention_backward_varlen(packed[0], *packed, packed[0], lse_packed, bias,
                                                                  mask, cu_seqlens, SEQ_LEN, table, index,
                                                                  d ** -0.5, p), **fields)
        for D in hidden_sizes:
            x = torch.empty((BATCH, SEQ_LEN, D), dtype=dt, device=meta)
            rows = torch.empty((BATCH, SEQ_LEN), dtype=torch.float32, device=meta)
            w = torch.empty((D,), dtype=dt, device=meta)
            tasks = torch.empty((3, D), dtype=dt, device=meta)
            index = torch.empty((BATCH,), dtype=torch.int64, device=meta)
            base = dict(dtype=dtype, head_dim=None, hidden_size=D, dropout=False, key_padding=None, yardstick=False)
            for residual in (x, None):
                variant = "residual" if residual is not None else "no residual"
                add(layer_norm_k, {"_fwd_kernel": "layer_norm_fwd"},
                    lambda: layer_norm_k.layer_norm_forward(x, w, w, tasks, tasks, index, residual, 1e-12),
                    variant=variant, **base)
                add(layer_norm_k, {"_bwd_kernel": "layer_norm_bwd"},
                    lambda: layer_norm_k.layer_norm_backward(x, x, w, tasks, tasks, index, residual, rows, rows),
                    variant=variant, **base)
            film_names = {"_bwd_kernel": "film_bwd", "_bwd_shared_kernel": "film_bwd_shared"}
            for film_x, variant in ((x, "x per example"), (x[0], "x shared")):
                add(film_k, {"_fwd_kernel": "film_fwd"}, lambda: film_k.film_forward(film_x, tasks, tasks, index),
                    variant=variant, **base)
                add(film_k, film_names, lambda: film_k.film_backward(x, film_x, tasks, index),
                    variant=variant, **base)
            down = torch.empty((D // 3, D), dtype=dt, device=meta)  # the bottleneck's d -> d // 3
            add(adapter_k, {"_fwd_kernel": "adapter_fwd"},
                lambda: adapter_k.film_linear_forward(x, tasks, tasks, index, down, down[:, 0]),
                variant="film + down-projection", **base)
    if kernels:
        jobs = [job for job in jobs if job["kernel"] in kernels]
    return jobs


# ---- compiling one configuration -------------------------------------------------------------------------------

def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"kernel_report: triton's bundled {name} is missing at {path}")
    return str(path)


def _arg_names(fn):
    """A kernel's argument names, through autotune / heuristics wrappers (the interpreter's kernels too)."""
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn.arg_names


def _unwrap(fn):
    """The JITFunction under triton.autotune / heuristics wrappers."""
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _kernel_fn(job: dict):
    """The job's JITFunction, from its kernel file."""
    import importlib

    return _unwrap(getattr(importlib.import_module(job["module"]), job["attr"]))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas, nvdisasm)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _specialize(job: dict):
    """What triton's JIT would compile for this launch: (fn, target, ASTSource arguments, options).

    The JIT's own binder specializes the arguments (pointer and integer
    divisibility by 16, integers equal to 1 as constants), so the kernel is
    the one a launch on that GPU would build.
    """
    import importlib

    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = _kernel_fn(job)
    target = GPUTarget("cuda", ARCHS[job["arch"]], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [MockTensor(getattr(torch, a[1])) if isinstance(a, tuple) and a[:1] == ("tensor",) else a
            for a in job["args"]]
    kwargs = dict(job["kwargs"])
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, target, (signature, constexprs, attrs), options


def compile_key(job: dict) -> str:
    """Equal keys compile to the same binary (e.g. layer norm at D 768 and 1024: both BLOCK_D 1024)."""
    fn, target, source_args, options = _specialize(job)
    return repr((job["module"], job["attr"], target.arch, source_args, sorted(options.__dict__.items())))


def _describe(job: dict) -> str:
    return (f"{job['kernel']} for {job['arch']} ({job['dtype']}, d={job['head_dim']}, D={job['hidden_size']}, "
            f"{job['kwargs']})")


def compile_batch(jobs: List[dict]) -> List[dict]:
    """Compiles recorded launches for one arch, then disassembles them in one nvdisasm call; returns each
    compiled kernel's figures (the disassembly's time shared out equally)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # never a cache hit: a hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True  # triton prints its own ptxas -v log: the registers it really got
    figures, codes = [], []
    for job in jobs:
        start, cpu_start = time.time(), _cpu_seconds()
        try:
            fn, target, source_args, options = _specialize(job)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, *source_args), target=target, options=options.__dict__)
            resources = parse_ptxas_log(log.getvalue())
            codes.append(text_section(compiled.asm["cubin"]))
        except Exception as error:
            raise RuntimeError(f"kernel_report: compiling {_describe(job)} failed: {error}") from error
        figures.append(dict(num_warps=options.num_warps, num_stages=options.num_stages, **resources,
                            smem_bytes=int(compiled.metadata.shared), triton=triton.__version__,
                            compile_s=time.time() - start, compile_cpu_s=_cpu_seconds() - cpu_start))
    start, cpu_start = time.time(), _cpu_seconds()
    listings = disassemble(codes, jobs[0]["arch"])
    share, cpu_share = (time.time() - start) / len(jobs), (_cpu_seconds() - cpu_start) / len(jobs)
    for figure, listing in zip(figures, listings):
        loop = _main_loop(listing)
        figure.update(tensor_core_op=_tensor_core_op(listing), loop_instructions=loop["instructions"],
                      loop=loop["loop"], inner_loops=loop["inner"], loop_wgmma=loop["mma"]["wgmma"],
                      loop_mma_sync=loop["mma"]["mma.sync"],
                      compile_s=round(figure["compile_s"] + share, 2),
                      compile_cpu_s=round(figure["compile_cpu_s"] + cpu_share, 2))
    return figures


def compile_job(job: dict) -> dict:
    """Compiles one recorded launch for job["arch"]; returns the compiled kernel's figures."""
    return compile_batch([job])[0]


def blocks_per_sm(arch: str, regs: int, smem_bytes: int, num_warps: int) -> int:
    """Thread blocks resident on one SM, as the CUDA occupancy calculator counts them: the least of what the
    register file holds (a warp's registers are allocated in units of 256, from one of the SM's four quarters),
    what shared memory holds (with the 1 KB the driver reserves per block), and the warp and block limits."""
    limit = SM_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256
    warps_by_regs = 4 * (limit["regs"] // 4 // regs_per_warp) if regs else limit["warps"]
    by_regs = warps_by_regs // num_warps
    by_smem = limit["smem"] // (smem_bytes + limit["smem_reserved"])
    return min(by_regs, by_smem, limit["warps"] // num_warps, limit["blocks"])


def report_row(job: dict, compiled: dict) -> dict:
    """One row of the report: the configuration and what it compiled to."""
    kw = job["kwargs"]
    row = dict(kernel=job["kernel"], arch=job["arch"], dtype=job["dtype"], head_dim=job["head_dim"],
               hidden_size=job["hidden_size"], block_m=kw.get("BLOCK_M"), block_n=kw.get("BLOCK_N", kw.get("BLOCK_D")),
               dropout=job["dropout"], key_padding=job["key_padding"], variant=job["variant"],
               yardstick=job["yardstick"])
    row.update(compiled)
    row["blocks_per_sm"] = blocks_per_sm(job["arch"], compiled["regs"], compiled["smem_bytes"], compiled["num_warps"])
    row["loop_instructions_per_score"] = None
    if job["kernel"] in SCORE_TILE_KERNELS:  # all the block's threads, over the tile's scores: compares warp counts
        row["loop_instructions_per_score"] = round(
            compiled["loop_instructions"] * 32 * compiled["num_warps"] / (row["block_m"] * row["block_n"]), 1)
    return row


# ---- the report -----------------------------------------------------------------------------------------------

def format_table(rows: List[dict]) -> str:
    columns = [("kernel", "kernel"), ("arch", "arch"), ("dtype", "dtype"), ("d/D", None), ("tile", None),
               ("w/s", None), ("drop", "dropout"), ("kpad", "key_padding"), ("yard", "yardstick"), ("regs", "regs"),
               ("spill", "spill_bytes"), ("smem", "smem_bytes"), ("blk/SM", "blocks_per_sm"), ("tc", "tensor_core_op"),
               ("serial", None), ("loop", "loop_instructions"), ("/score", "loop_instructions_per_score"),
               ("mma g/s", None), ("inner loops", None), ("variant", "variant")]

    def cell(row, title, key):
        if title == "d/D":
            return str(row["head_dim"] if row["head_dim"] is not None else row["hidden_size"])
        if title == "tile":
            return f"{row['block_m']}x{row['block_n']}"
        if title == "w/s":
            return f"{row['num_warps']}/{row['num_stages']}"
        if title == "mma g/s":  # the main loop's wgmma / mma.sync instructions
            return f"{row['loop_wgmma']}/{row['loop_mma_sync']}"
        if title == "serial":  # y: ptxas serialized the kernel's wgmma, the reason in the JSON
            return "y" if row.get("wgmma_serialized") else "n" if row["tensor_core_op"] == "wgmma" else "-"
        if title == "inner loops":  # every innermost loop, when there are several (attention: off band, band, off)
            inner = row.get("inner_loops") or []
            return "/".join(map(str, inner)) if len(inner) > 1 else "-"
        value = row[key]
        return "-" if value is None else ("y" if value is True else "n" if value is False else str(value))

    table = [[title for title, _ in columns]] + [[cell(r, t, k) for t, k in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


DISASSEMBLY_BATCH = 8  # kernels per nvdisasm call: 0.4 s of CPU per call, not per kernel; small enough to share out
# Queue order: the longest compiles first, so that no long one starts last while the other process idles.
_COMPILE_WEIGHT = {"attention_fwd": 4, "attention_bwd_dkdv": 4, "attention_fwd_varlen": 4,
                   "attention_bwd_dkdv_varlen": 4, "attention_bwd_dq": 3, "attention_bwd_dq_varlen": 3}


def _fingerprint(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _tools_fingerprint() -> str:
    """The compiler and disassembler binaries (path, size, mtime), this script, and triton's version."""
    import triton

    bundled = Path(_tool("nvdisasm")).parent  # triton's ptxas builds sit beside it, unless TRITON_PTXAS* points away
    overrides = sorted((k, v) for k, v in os.environ.items() if k.startswith("TRITON_PTXAS"))
    tools = sorted([str(p) for p in bundled.iterdir()] + [v for _, v in overrides if os.path.isfile(v)])
    stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in tools]
    return _fingerprint(triton.__version__, stats, overrides, Path(__file__).read_bytes())


def cache_file(cache: Path, job: dict, key: str, tools: str) -> Path:
    """Where the figures of the job's binary are cached: a hash of the launch, the kernel's sources and the tools."""
    return cache / f"{_fingerprint(key, _kernel_fn(job).cache_key, tools)}.json"


def _read_cached(path: Path) -> Optional[dict]:
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short: compile again
        return None
    return figures if isinstance(figures, dict) and "loop_instructions" in figures else None


def _write_cached(path: Path, figures: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(figures))
    tmp.replace(path)  # atomic: a reader never sees half a file


def _init_worker(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)


def run(jobs: List[dict], workers: int, progress: bool = True, cache: Optional[Path] = None,
        use_cache: bool = True) -> tuple:
    """Compiles the jobs on a process pool, each distinct binary once; figures found in `cache` (a folder, or None
    for no cache) are not compiled again unless use_cache is False. Returns (rows in job order, compiles,
    cache hits)."""
    from tqdm import tqdm

    keys = [compile_key(job) for job in jobs]
    unique = {key: job for key, job in zip(keys, jobs)}
    compiled: Dict[str, dict] = {}
    files: Dict[str, Path] = {}
    if cache is not None:
        tools = _tools_fingerprint()
        files = {key: cache_file(cache, job, key, tools) for key, job in unique.items()}
        if use_cache:
            for key, path in files.items():
                figures = _read_cached(path)
                if figures is not None:
                    compiled[key] = figures
    hits = len(compiled)
    todo = sorted((key for key in unique if key not in compiled),
                  key=lambda key: -_COMPILE_WEIGHT.get(unique[key]["kernel"], 1))
    # Batches of one arch (one disassembler call each), the longest compiles first.
    batches = []
    for arch in ARCHS:
        keys_of_arch = [key for key in todo if unique[key]["arch"] == arch]
        batches += [keys_of_arch[i:i + DISASSEMBLY_BATCH] for i in range(0, len(keys_of_arch), DISASSEMBLY_BATCH)]
    batches.sort(key=lambda batch: -sum(_COMPILE_WEIGHT.get(unique[key]["kernel"], 1) for key in batch))
    # A private, empty triton cache: the user's is left alone.
    with tempfile.TemporaryDirectory(prefix="kernel-report-cache-") as triton_cache:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(triton_cache,)) as pool:
            futures = {pool.submit(compile_batch, [unique[key] for key in batch]): batch for batch in batches}
            bar = tqdm(total=len(todo), desc="compiling kernels", unit="kernel", disable=not progress,
                       file=sys.stderr)
            for future in as_completed(futures):
                batch = futures[future]
                try:
                    results = future.result()
                except Exception as error:  # the configuration that failed is named in the error; stop
                    pool.shutdown(wait=False, cancel_futures=True)
                    if isinstance(error, RuntimeError) and str(error).startswith("kernel_report:"):
                        raise
                    raise RuntimeError(f"kernel_report: a batch with {_describe(unique[batch[0]])} failed: "
                                       f"{error}") from error
                for key, figures in zip(batch, results):
                    compiled[key] = figures
                    if key in files:
                        _write_cached(files[key], figures)
                bar.update(len(batch))
                job = unique[batch[-1]]
                bar.set_postfix_str(f"{job['kernel']} {job['arch']} {job['dtype']}")
            bar.close()
    return [report_row(job, compiled[key]) for key, job in zip(keys, jobs)], len(compiled) - hits, hits


_KERNEL_ORDER = ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv", "attention_fwd_varlen",
                 "attention_bwd_dq_varlen", "attention_bwd_dkdv_varlen", "layer_norm_fwd", "layer_norm_bwd",
                 "film_fwd", "film_bwd", "film_bwd_shared", "adapter_fwd")


def _row_order(row: dict):
    """Attention first, by arch, dtype and head dim, the passes side by side (padded, the odd length, yardstick,
    then varlen); then the norm/FiLM/adapter kernels."""
    family = 0 if row["kernel"].startswith("attention") else 1
    kernel = _KERNEL_ORDER.index(row["kernel"]) if row["kernel"] in _KERNEL_ORDER else len(_KERNEL_ORDER)
    size = row["head_dim"] if family == 0 else row["hidden_size"]
    return (family, list(ARCHS).index(row["arch"]), row["dtype"], size, row["kernel"].endswith("_varlen"),
            row["variant"].startswith("L="), row["yardstick"], row["dropout"],
            bool(row["key_padding"]), kernel if family == 0 else 0, kernel, row["variant"])


def _row_name(row: dict) -> str:
    flags = [name for name, on in (("dropout", row["dropout"]), ("key padding", row["key_padding"]),
                                   ("yardstick", row["yardstick"])) if on]
    size = f"d={row['head_dim']}" if row["head_dim"] is not None else f"D={row['hidden_size']}"
    return " ".join(part for part in [row["kernel"], row["arch"], row["dtype"], size, row["variant"]] + flags if part)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("KERNEL_REPORT_OUT", ".benchmarks/kernel-report"),
                        help="folder for kernel-report.json (default $KERNEL_REPORT_OUT or .benchmarks/kernel-report)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="compiler processes (default: one per core, at most 8; each peaked at 0.45 GB here)")
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=list(DEFAULT_ARCHS),
                        help="default: %(default)s")
    parser.add_argument("--dtype", nargs="+", choices=DTYPE_CHOICES, default=list(DTYPES),
                        help="default: %(default)s (fp32: the TF32 kernels, which the default leaves out)")
    parser.add_argument("--head-dim", nargs="+", type=int, default=list(HEAD_DIMS))
    parser.add_argument("--hidden", nargs="+", type=int, default=list(HIDDEN_SIZES))
    parser.add_argument("--kernel", nargs="+", help="only these kernels, e.g. attention_fwd layer_norm_bwd")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile every kernel again, even those cached in <out>/cache (the cache is refreshed)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # set by the test suite's conftest; never wanted here
    start = time.time()
    jobs = collect_configs(tuple(args.arch), tuple(args.dtype), tuple(args.head_dim), tuple(args.hidden),
                           args.kernel)
    if not jobs:
        parser.error("no kernel configuration matches the filters")
    out = Path(args.out)
    rows, compiles, hits = run(jobs, max(1, args.jobs), progress=not args.no_progress, cache=out / "cache",
                               use_cache=not args.no_cache)
    rows.sort(key=_row_order)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    report = {"triton": triton.__version__, "seq_len": SEQ_LEN, "batch": BATCH, "fields": list(FIELDS),
              "seconds": round(time.time() - start, 1), "compiles": compiles, "cache_hits": hits, "rows": rows}
    (out / "kernel-report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(rows))
    serialized = [_row_name(row) for row in rows if row.get("wgmma_serialized")]
    print(f"\nwgmma serialized by ptxas in {len(serialized)} rows" + "".join(f"\n  {s}" for s in serialized))
    print(f"\n{len(rows)} configurations, {compiles + hits} distinct kernels: {compiles} compiled, {hits} from the "
          f"cache ({out / 'cache'}), in {report['seconds']} s (triton {triton.__version__}, {args.jobs} processes); "
          f"wrote {out / 'kernel-report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
