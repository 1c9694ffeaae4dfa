"""Fused conditional attention (camtl, Triton) against SDPA, FlexAttention and the published algorithm.

Every implementation computes softmax(q kᵀ/√d + M(table, index) + key padding) v, with
M the CA-MTL block-diagonal bias read from a learnable block table [G, L, c] (8 tasks
mixed in the batch), except the SDPA flash row: it has no bias and no mask, and is the
speed bound. Each row is checked against the fp32 torch reference (output and the
gradients of q, k, v and the table), then forward and forward+backward are timed in
bf16. The issue's fwd+bwd targets for camtl are printed after the table.

Needs a CUDA GPU: on the CPU the fused kernel only runs under Triton's interpreter,
far too slow to time, so ``run`` returns a note per shape. ``--cpu-smoke`` runs the
whole CUDA code path on the CPU instead (fp32, a tiny shape, the interpreter, SDPA's
math backend for flash, FlexAttention forward only): a test of this file, not a benchmark.

    python benchmarks/bench_attention.py [--quick]
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:
    # Read by triton when the kernels are defined, so before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "1"

import functools  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Dict, List  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import camtl  # noqa: E402
from camtl import ops  # noqa: E402
from camtl.backends import torch_ref  # noqa: E402

from common import CHECK_TOLERANCES, IMPL_COLUMNS, Impl, bench_impl, grad_step, progress  # noqa: E402
from common import print_table as _print_table  # noqa: E402

NUM_TASKS = 8
LEAVES = ("q", "k", "v", "table")  # what the rows with a bias differentiate


@dataclass(frozen=True)
class Shape:
    B: int
    H: int
    L: int
    d: int
    hidden: int  # the model width: CA-MTL's block count is hidden // L (max_seq_length = L here)

    @property
    def blocks(self) -> int:
        return self.hidden // self.L

    @property
    def c(self) -> int:  # the block width, as the published CBDA: ceil(L / blocks)
        return math.ceil(self.L / self.blocks)

    def __str__(self):
        return f"B={self.B} H={self.H} L={self.L} d={self.d} c={self.c}"


SHAPES = [Shape(32, 12, 128, 64, 768),  # BERT-base: 6 blocks of 22
          Shape(8, 16, 512, 64, 1024)]  # BERT-large, long sequences: 2 blocks of 256
SMOKE_SHAPE = Shape(2, 2, 32, 32, 96)  # 3 blocks of 11


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """q, k, v, table (leaves needing a gradient), the task index and the key padding in its three forms."""
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same inputs on every device
    B, H, L, d, c = shape.B, shape.H, shape.L, shape.d, shape.c
    floats = {name: torch.randn(B, H, L, d, generator=g) for name in ("q", "k", "v")}
    # N(0, 1) like the scaled scores, so that a wrong bias shows in the output.
    floats["table"] = torch.randn(NUM_TASKS, L, c, generator=g)
    x = {k: t.to(device=device, dtype=dtype).requires_grad_() for k, t in floats.items()}
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    keep = torch.arange(L)[None, :] < lengths[:, None]
    x["index"] = (torch.arange(B) % NUM_TASKS).to(device)
    x["lengths"] = lengths.to(device)
    x["mask"] = keep.to(device)  # bool, True = attend: what camtl takes
    x["key_add"] = ((~keep) * -10000.0).to(device=device, dtype=dtype)  # the published additive form
    return x


def camtl_impl(x):
    return ops.conditional_attention(x["q"], x["k"], x["v"], x["table"], x["index"], x["mask"])


def dense_bias(x):
    L = x["q"].shape[2]
    return torch_ref.block_bias(x["table"], x["index"], L)[:, None] + x["key_add"][:, None, None, :]


def sdpa_bias_impl(x):
    # Built inside the timed function: the table's gradient flows through the dense [B, 1, L, L] bias.
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=dense_bias(x))


def sdpa_choice(x) -> str:
    """The kernel SDPA picks for the dense-bias row (a private torch function: best effort, '?' if it fails)."""
    try:
        return SDPBackend(torch._fused_sdp_choice(x["q"], x["k"], x["v"], dense_bias(x), 0.0, False)).name.lower()
    except Exception:  # noqa: BLE001
        return "?"


def published_impl(blocks: int):
    def fn(x):
        q, k, v, table = x["q"], x["k"], x["v"], x["table"]
        L = q.shape[2]
        # PublishedCBDA: per-example block_diag of the table's row chunks, cropped to L columns.
        bias = torch.stack([torch.block_diag(*t.chunk(blocks, 0)) for t in table[x["index"]]])[:, :, :L]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores + bias[:, None] + x["key_add"][:, None, None, :]
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    return fn


@functools.lru_cache(maxsize=None)
def compiled_flex():
    """Imported on first use: where torch lacks FlexAttention, that is the row's error, not the bench's."""
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one static graph per shape, as the other rows get.
    return torch.compile(flex_attention, dynamic=False)


def flex_impl(x, c: int, backward: bool):
    """Compiled FlexAttention whose score_mod reads the same learnable table (a captured tensor)."""
    # FlexAttention has no CPU backward and refuses inputs that need a gradient there.
    src = x if backward else {k: t.detach() for k, t in x.items()}
    table, index, lengths = src["table"], src["index"], src["lengths"]

    def score_mod(score, b, h, q_idx, kv_idx):
        col = (kv_idx - c * (q_idx // c)).clamp(0, c - 1)  # clamped: the gather must stay in bounds off the band
        bias = torch.where(q_idx // c == kv_idx // c, table[index[b], q_idx, col], 0.0)
        # Padding as -inf here rather than a block mask: like camtl's kernel, no skipping of padded key
        # blocks, and no per-batch create_block_mask to time.
        return torch.where(kv_idx < lengths[b], score + bias, float("-inf"))

    return lambda _: compiled_flex()(src["q"], src["k"], src["v"], score_mod=score_mod)


def implementations(shape: Shape, x, device: torch.device) -> List[Impl]:
    cuda = device.type == "cuda"
    flash = SDPBackend.FLASH_ATTENTION if cuda else SDPBackend.MATH  # no flash kernel on the CPU
    return [
        Impl("camtl", "camtl triton", camtl_impl, LEAVES, context=lambda: camtl.use_backend("triton")),
        Impl("flash", f"SDPA {'flash' if cuda else 'math (CPU)'}, no bias/mask",
             lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"]), leaves=("q", "k", "v"),
             context=lambda: sdpa_kernel(flash), comparable=False, note="n/a (no bias)"),
        Impl("sdpa_bias", f"SDPA + dense bias ({sdpa_choice(x)})", sdpa_bias_impl, LEAVES),
        Impl("flex", "FlexAttention compiled", flex_impl(x, shape.c, backward=cuda),
             leaves=LEAVES if cuda else (), note="" if cuda else "fwd only (no CPU backward)"),
        Impl("published", "published block_diag", published_impl(shape.blocks), LEAVES),
    ]


def reference_impl(x):
    with camtl.use_backend("torch"):
        return camtl_impl(x)


# The fwd+bwd targets for camtl: (key, baseline, text, ratio(camtl ms, baseline ms), met(ratio)).
TARGETS = [
    ("flash", "flash", "camtl <= 1.15x SDPA flash (no bias)", lambda ours, base: ours / base, lambda r: r <= 1.15),
    ("flex", "flex", "camtl >= 2x faster than FlexAttention", lambda ours, base: base / ours, lambda r: r >= 2.0),
    ("sdpa_bias", "sdpa_bias", "camtl >= 3x faster than SDPA + dense bias", lambda ours, base: base / ours,
     lambda r: r >= 3.0),
]


def add_targets(rows: List[dict]) -> None:
    """Writes target_<key>_ratio and target_<key>_met on the camtl row (None where a row has no time)."""
    by_key = {r["impl"]: r for r in rows}
    ours = by_key["camtl"]
    for key, base_key, _, ratio, met in TARGETS:
        a, b = ours.get("fwd_bwd_ms"), by_key.get(base_key, {}).get("fwd_bwd_ms")
        r = ratio(a, b) if a and b else None
        ours[f"target_{key}_ratio"], ours[f"target_{key}_met"] = r, (None if r is None else met(r))


def bench_shape(shape: Shape, dtype: torch.dtype, device: torch.device, quick: bool) -> List[dict]:
    x = make_inputs(shape, dtype, device)
    grad_out = torch.randn(x["q"].shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    # The reference: the torch backend in fp32 on fp32 copies of the same inputs.
    x32 = {k: (t.detach().float().requires_grad_() if t.is_floating_point() else t) for k, t in x.items()}
    ref = {k: t.detach() for k, t in grad_step(reference_impl, LEAVES, x32, grad_out.float()).items()}
    impls = implementations(shape, x, device)
    rows = [bench_impl(impl, shape, x, ref, grad_out, dtype, device, quick)
            for impl in progress(impls, f"bench_attention {shape}")]
    add_targets(rows)
    return rows


def run(device: torch.device, quick: bool, smoke: bool = False) -> List[dict]:
    if smoke:
        return bench_shape(SMOKE_SHAPE, torch.float32, device, quick=True)
    if device.type != "cuda":
        note = "needs a CUDA GPU: on the CPU the fused kernel runs only under Triton's interpreter, too slow to time"
        return [{"impl": "-", "shape": str(s), "device": str(device), "note": note} for s in SHAPES]
    rows = []
    for shape in SHAPES:
        rows += bench_shape(shape, torch.bfloat16, device, quick)
    return rows




def print_table(rows: List[dict]) -> None:
    if rows and all("note" in r for r in rows):
        print(f"\nbench_attention: skipped on {rows[0]['device']} ({len(rows)} shapes): {rows[0]['note']}")
        return
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        head = group[0]
        _print_table(f"conditional attention, {head['dtype']} on {head['device']}, {shape}, {NUM_TASKS} tasks, "
                     "key padding in [L/2, L]", group, IMPL_COLUMNS)
        for r in group:
            if "error" in r:
                print(f"  {r['name']}: {r['error']}")
            elif r.get("pass") is False:
                print(f"  FAIL {r['name']}: worst {r['worst']} (max abs err {r['max_err']:.2e})")
        ours = next(r for r in group if r["impl"] == "camtl")
        for key, _, text, _, _ in TARGETS:
            ratio, met = ours.get(f"target_{key}_ratio"), ours.get(f"target_{key}_met")
            verdict = "n/a (a row has no fwd+bwd time)" if ratio is None else "met" if met else "MISSED"
            print(f"  target, fwd+bwd: {text}: {verdict}" + ("" if ratio is None else f" ({ratio:.2f}x)"))
    dtype = torch.bfloat16 if rows[0]["dtype"] == "bfloat16" else torch.float32
    rtol, atol = CHECK_TOLERANCES[dtype]
    print(f"check: output and dq, dk, dv, dtable (where the row has them) allclose to the fp32 torch reference, "
          f"rtol {rtol:g} atol {atol:g} (atol x max|ref| per tensor); max err: max abs difference")


if __name__ == "__main__":
    from common import bench_main

    bench_main(__doc__, run, print_table)
