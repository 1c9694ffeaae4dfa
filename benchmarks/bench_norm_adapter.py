"""Fused conditional layer norm and FiLM bottleneck (camtl, Triton) against the published algorithm and the bounds.

Conditional LN: y = LN(x + residual) with the scale (1 + γ[index]) * weight + β[index] of each example's
task (γ, β: learnable tables [8, D], 8 tasks mixed in the batch). Rows:
  - camtl triton, and camtl's torch backend (vectorized, no loop), both ``ops.conditional_layer_norm``;
  - the published algorithm: the residual add, then ``PublishedConditionalLayerNorm.forward``'s loop over the
    tasks present (gather the task's rows, F.layer_norm with that task's FiLM'd weight, scatter back),
    written directly over the γ/β table. The module computes each task's γ/β with a Linear on its first
    condition row; the op-level rows take the table as input, so that Linear is left out here (it is in
    bench_modules, module against module);
  - the bound: F.layer_norm(x + residual) with a plain weight (no conditioning).
The LN rows also give achieved GB/s on the minimal bytes (``cln_bytes``) as a % of the device's copy
bandwidth (``copy_bandwidth``).

Bottleneck: camtl ``ops.film_linear`` (FiLM in the down-projection's prologue, Triton) then the
up-projection d//3 -> d; the published ConditionalBottleNeck's FiLM (per-example γ/β gathered from the
table, so again without the Linears that make them) then its two Linears; and the bound, the two Linears
without FiLM. The Linears are F.linear on leaf weights (what nn.Linear runs), so their gradients are checked.

Every conditioned row is checked against the fp32 torch backend on fp32 copies of the inputs (output and
every gradient); the bounds compute something else and are "n/a". Then forward and forward+backward are
timed in bf16 at B·L = 4096 (B=32, L=128), D = 768 and 1024. The issue's targets are printed per shape.

Needs a CUDA GPU: on the CPU the kernels only run under Triton's interpreter, so ``run`` returns a note per
shape. ``--cpu-smoke`` runs the whole CUDA code path on the CPU instead (fp32, a tiny shape, the
interpreter, a small copy buffer): a test of this file, not a benchmark.

    python benchmarks/bench_norm_adapter.py [--quick]
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:
    # Read by triton when the kernels are defined, so before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import camtl  # noqa: E402
from camtl import ops  # noqa: E402
from camtl.backends import resolve  # noqa: E402

from common import CHECK_TOLERANCES, IMPL_COLUMNS, Impl, bench_impl, grad_step  # noqa: E402
from common import progress, time_ms  # noqa: E402
from common import print_table as _print_table  # noqa: E402

NUM_TASKS = 8
EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    B: int
    L: int
    D: int

    @property
    def N(self) -> int:  # the bottleneck width, as published
        return self.D // 3

    def __str__(self):
        return f"B={self.B} L={self.L} D={self.D}"


SHAPES = [Shape(32, 128, 768), Shape(32, 128, 1024)]  # B·L = 4096 rows
SMOKE_SHAPE = Shape(12, 4, 96)  # 12 examples: all 8 tasks, 4 of them twice
COPY_BYTES = {False: 1 << 30, True: 4 << 20}  # per buffer, by smoke: 1 GiB is far beyond any L2


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Every input of both ops (float leaves needing a gradient) and the task index arange(B) % 8."""
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same inputs on every device

    def randn(*size, std=1.0, mean=0.0):
        return mean + std * torch.randn(*size, generator=g)

    B, L, D, N = shape.B, shape.L, shape.D, shape.N
    floats = {
        "x": randn(B, L, D), "residual": randn(B, L, D),
        "weight": randn(D, std=0.1, mean=1.0), "bias": randn(D, std=0.1),
        # Large enough that a row normalized with another task's scale fails the check.
        "gamma": randn(NUM_TASKS, D, std=0.5), "beta": randn(NUM_TASKS, D, std=0.5),
        "w_down": randn(N, D, std=D ** -0.5), "b_down": randn(N, std=0.1),
        "w_up": randn(D, N, std=N ** -0.5), "b_up": randn(D, std=0.1),
    }
    x = {k: t.to(device=device, dtype=dtype).requires_grad_() for k, t in floats.items()}
    x["index"] = (torch.arange(B) % NUM_TASKS).to(device)
    return x


# ---- conditional layer norm --------------------------------------------------------------------------------

CLN_LEAVES = ("x", "residual", "weight", "bias", "gamma", "beta")


def cln_camtl(x):
    return ops.conditional_layer_norm(x["x"], x["weight"], x["bias"], x["gamma"], x["beta"], x["index"], EPS,
                                      x["residual"])


def cln_published(x):
    """The residual add, then PublishedConditionalLayerNorm.forward's loop, each task's γ/β read from the table."""
    h = x["x"] + x["residual"]
    index = x["index"]
    out = torch.zeros_like(h)
    for task in torch.unique(index):
        rows = index == task
        weight = (1 + x["gamma"][task]) * x["weight"] + x["beta"][task]
        out[rows] = F.layer_norm(h[rows], (h.shape[-1],), weight, x["bias"], EPS)
    return out


def ln_bound(x):
    return F.layer_norm(x["x"] + x["residual"], (x["x"].shape[-1],), x["weight"], x["bias"], EPS)


def cln_bytes(shape: Shape, dtype: torch.dtype) -> Tuple[int, int]:
    """The minimal bytes a conditional LN moves: (forward, forward+backward).

    s = the element size, act = B·L·D·s (one activation tensor), stats = 2·B·L·4 (mean and rstd, fp32),
    tables = (2·D + 2·G·D)·s + 8·B (weight, bias, γ, β and the int64 index).
      forward          = 3·act + tables     read x, residual; write y; read the tables
      forward+backward = forward + stats    the training forward also writes mean and rstd
                       + 4·act + stats      read dy, x, residual, mean/rstd; write dx (it is also d residual)
                       + 2·tables           read the tables, write their gradients (≈: dw, db, dγ, dβ)
    Recomputing x + residual in the backward costs what saving it would (write h, read h): 7·act either way.
    """
    s = torch.finfo(dtype).bits // 8
    act = shape.B * shape.L * shape.D * s
    stats = 2 * shape.B * shape.L * 4
    tables = (2 * shape.D + 2 * NUM_TASKS * shape.D) * s + 8 * shape.B
    forward = 3 * act + tables
    return forward, forward + 4 * act + 2 * stats + 2 * tables


# ---- bottleneck ----------------------------------------------------------------------------------------------

BN_LEAVES = ("x", "gamma", "beta", "w_down", "b_down", "w_up", "b_up")


def bn_camtl(x):
    h = ops.film_linear(x["x"], x["gamma"], x["beta"], x["index"], x["w_down"], x["b_down"])
    return F.linear(h, x["w_up"], x["b_up"])


def bn_published(x):
    """PublishedConditionalBottleNeck.forward from its per-example γ/β [B, 1, D] on: FiLM, down, up."""
    gamma, beta = x["gamma"][x["index"]].unsqueeze(1), x["beta"][x["index"]].unsqueeze(1)
    h = (1 + gamma) * x["x"] + beta
    return F.linear(F.linear(h, x["w_down"], x["b_down"]), x["w_up"], x["b_up"])


def bn_bound(x):
    return F.linear(F.linear(x["x"], x["w_down"], x["b_down"]), x["w_up"], x["b_up"])


# ---- FiLM (the conditional alignment's op) --------------------------------------------------------------------

FILM_LEAVES = ("x", "gamma", "beta")


def film_camtl(x):
    return ops.film(x["x"], x["gamma"], x["beta"], x["index"])


def film_published(x):
    """The published FiLM: per-example γ/β [B, 1, D] gathered, then broadcast."""
    gamma, beta = x["gamma"][x["index"]].unsqueeze(1), x["beta"][x["index"]].unsqueeze(1)
    return (1 + gamma) * x["x"] + beta


def affine_bound(x):
    return x["x"] * x["weight"] + x["bias"]


def cuda_backend_problem(device: torch.device) -> Optional[str]:
    """Why the cuda backend (camtl._C) cannot run here, or None."""
    from camtl.backends import backend_state

    state = backend_state("cuda")
    if device.type != "cuda" or not state.available:
        return f"the cuda backend is off: {state.reason}"
    return None


# ---- rows ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def on_backend(name: str, op: str, device: torch.device):
    """camtl.use_backend(name), checking that ``op`` runs there (a backend lacking an op falls back to torch)."""
    with camtl.use_backend(name):
        got, _ = resolve(op, device)
        if got != name:
            raise RuntimeError(f"camtl runs {op!r} on the {got!r} backend, not {name!r}")
        yield


CAMTL_KEYS = ("camtl", "cuda", "torch")  # rows of the code under test: an error fails the bench


def backend_rows(fn: Callable, leaves: Tuple[str, ...], op: str, device: torch.device) -> List[Impl]:
    """camtl's rows of one op: triton, cuda (camtl._C, only where it runs) and the torch backend."""
    names = {"camtl": "triton", "cuda": "cuda", "torch": "torch"}
    labels = {"camtl": "camtl triton", "cuda": "camtl cuda (camtl._C)", "torch": "camtl torch backend"}
    keys = [k for k in names if k != "cuda" or cuda_backend_problem(device) is None]
    return [Impl(k, labels[k], fn, leaves, context=lambda name=names[k]: on_backend(name, op, device)) for k in keys]


def implementations(device: torch.device) -> Dict[str, List[Impl]]:
    """The rows of each op."""
    no_cond = dict(comparable=False, note="n/a (no conditioning)")
    return {
        "cln": backend_rows(cln_camtl, CLN_LEAVES, "conditional_layer_norm", device) + [
            Impl("published", "published loop over tasks", cln_published, CLN_LEAVES),
            Impl("bound", "F.layer_norm(x + res), no cond.", ln_bound, ("x", "residual", "weight", "bias"),
                 **no_cond),
        ],
        "bottleneck": [
            Impl("camtl", "camtl film_linear + Linear", bn_camtl, BN_LEAVES,
                 context=lambda: on_backend("triton", "film_linear", device)),
            Impl("published", "published FiLM + 2 Linear", bn_published, BN_LEAVES),
            Impl("bound", "2 plain Linear, no FiLM", bn_bound, ("x", "w_down", "b_down", "w_up", "b_up"), **no_cond),
        ],
        "film": backend_rows(film_camtl, FILM_LEAVES, "film", device) + [
            Impl("published", "published gather + broadcast", film_published, FILM_LEAVES),
            Impl("bound", "x * w + b, no cond.", affine_bound, ("x", "weight", "bias"), **no_cond),
        ],
    }


REFERENCES = {"cln": (cln_camtl, CLN_LEAVES), "bottleneck": (bn_camtl, BN_LEAVES), "film": (film_camtl, FILM_LEAVES)}
TITLES = {"cln": "conditional LN(x + residual)", "bottleneck": "bottleneck D -> D//3 -> D",
          "film": "FiLM (1 + gamma[t]) x + beta[t]"}


def copy_bandwidth(device: torch.device, quick: bool, nbytes: int) -> Dict[str, float]:
    """copy_gbs: GB/s of dst.copy_(src) between two nbytes buffers, counting the read and the write (2·nbytes)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick)["median_ms"]
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the 2 GiB back to the benches that follow
    return {"copy_gbs": 2 * nbytes / (ms * 1e-3) / 1e9, "copy_mib": nbytes / 2 ** 20}


def add_bandwidth(row: dict, shape: Shape, dtype: torch.dtype, copy: Dict[str, float]) -> None:
    row.update(copy)
    copy_gbs = copy["copy_gbs"]
    for phase, nbytes in zip(("fwd", "fwd_bwd"), cln_bytes(shape, dtype)):
        ms = row.get(f"{phase}_ms")
        if ms:
            row[f"{phase}_gbs"] = nbytes / (ms * 1e-3) / 1e9
            row[f"{phase}_pct_copy"] = 100 * row[f"{phase}_gbs"] / copy_gbs


@dataclass(frozen=True)
class Target:
    op: str  # the group whose camtl row it judges
    key: str
    text: str
    value: Callable[[dict, Dict[str, dict]], Optional[float]]  # (camtl row, rows by key) -> measured value
    met: Callable[[float], bool]
    unit: str  # "x" or "%"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


# The targets (GPU, bf16, each shape), all on forward+backward.
TARGETS = [
    Target("cln", "copy", "CLN >= 70% of copy bandwidth", lambda ours, by: ours.get("fwd_bwd_pct_copy"),
           lambda v: v >= 70, "%"),
    Target("cln", "ln_add", "CLN <= 1.1x F.layer_norm + add",
           lambda ours, by: _ratio(ours.get("fwd_bwd_ms"), by.get("bound", {}).get("fwd_bwd_ms")),
           lambda v: v <= 1.1, "x"),
    Target("cln", "published", f"CLN >= 10x faster than the published loop ({NUM_TASKS} tasks)",
           lambda ours, by: _ratio(by.get("published", {}).get("fwd_bwd_ms"), ours.get("fwd_bwd_ms")),
           lambda v: v >= 10, "x"),
    Target("bottleneck", "linear", "bottleneck <= 1.3x two plain Linear",
           lambda ours, by: _ratio(ours.get("fwd_bwd_ms"), by.get("bound", {}).get("fwd_bwd_ms")),
           lambda v: v <= 1.3, "x"),
]


def add_targets(rows: List[dict]) -> None:
    """Writes target_<key> (the measured value, None if a row lacks a time) and target_<key>_met on the camtl row."""
    for t in TARGETS:
        by_key = {r["impl"]: r for r in rows if r["op"] == t.op}
        ours = by_key["camtl"]
        v = t.value(ours, by_key)
        ours[f"target_{t.key}"], ours[f"target_{t.key}_met"] = v, (None if v is None else t.met(v))


def bench_shape(shape: Shape, dtype: torch.dtype, device: torch.device, quick: bool,
                copy: Dict[str, float]) -> List[dict]:
    x = make_inputs(shape, dtype, device)
    grad_out = torch.randn(shape.B, shape.L, shape.D, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(device=device, dtype=dtype)
    # The reference: the torch backend in fp32 on fp32 copies of the same inputs.
    x32 = {k: (t.detach().float().requires_grad_() if t.is_floating_point() else t) for k, t in x.items()}
    rows = []
    for op, impls in implementations(device).items():
        fn, leaves = REFERENCES[op]
        with camtl.use_backend("torch"):
            ref = {k: t.detach() for k, t in grad_step(fn, leaves, x32, grad_out.float()).items()}
        for impl in progress(impls, f"bench_norm_adapter {op} {shape}"):
            row = bench_impl(impl, shape, x, ref, grad_out, dtype, device, quick)
            row["op"] = op
            if "error" in row and impl.key in CAMTL_KEYS:
                row["pass"] = False
            if op == "cln":
                add_bandwidth(row, shape, dtype, copy)
            rows.append(row)
    add_targets(rows)
    return rows


def run(device: torch.device, quick: bool, smoke: bool = False) -> List[dict]:
    if smoke:
        copy = copy_bandwidth(device, True, COPY_BYTES[True])
        return bench_shape(SMOKE_SHAPE, torch.float32, device, True, copy)
    if device.type != "cuda":
        note = "needs a CUDA GPU: on the CPU the fused kernels run only under Triton's interpreter, too slow to time"
        return [{"impl": "-", "shape": str(s), "device": str(device), "note": note} for s in SHAPES]
    copy = copy_bandwidth(device, quick, COPY_BYTES[False])
    rows = []
    for shape in SHAPES:
        rows += bench_shape(shape, torch.bfloat16, device, quick, copy)
    return rows


CLN_COLUMNS = IMPL_COLUMNS + [
    ("fwd GB/s", "fwd_gbs", ".0f"),
    ("fwd %copy", "fwd_pct_copy", ".0f"),
    ("fwd+bwd GB/s", "fwd_bwd_gbs", ".0f"),
    ("fwd+bwd %copy", "fwd_bwd_pct_copy", ".0f"),
]


def print_table(rows: List[dict]) -> None:
    if rows and all("note" in r for r in rows):
        print(f"\nbench_norm_adapter: skipped on {rows[0]['device']} ({len(rows)} shapes): {rows[0]['note']}")
        return
    head = rows[0]
    copy = next((r for r in rows if "copy_gbs" in r), None)
    if copy is not None:
        print(f"\ncopy bandwidth, dst.copy_(src) of {copy['copy_mib']:.0f} MiB counting read + write: "
              f"{copy['copy_gbs']:.0f} GB/s")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for op, title in TITLES.items():
            group = [r for r in rows if r["shape"] == shape and r["op"] == op]
            _print_table(f"{title}, {head['dtype']} on {head['device']}, {shape}, {NUM_TASKS} tasks", group,
                         CLN_COLUMNS if op == "cln" else IMPL_COLUMNS)
            for r in group:
                if "error" in r:
                    print(f"  {r['name']}: {r['error']}")
                elif r.get("pass") is False:
                    print(f"  FAIL {r['name']}: worst {r['worst']} (max abs err {r['max_err']:.2e})")
        ours = {r["op"]: r for r in rows if r["shape"] == shape and r["impl"] == "camtl"}
        for t in TARGETS:
            v, met = ours[t.op].get(f"target_{t.key}"), ours[t.op].get(f"target_{t.key}_met")
            verdict = "n/a (a row has no fwd+bwd time)" if v is None else "met" if met else "MISSED"
            measured = "" if v is None else f" ({v:.0f}%)" if t.unit == "%" else f" ({v:.2f}x)"
            print(f"  target, fwd+bwd, {shape}: {t.text}: {verdict}{measured}")
    dtype = torch.bfloat16 if head["dtype"] == "bfloat16" else torch.float32
    rtol, atol = CHECK_TOLERANCES[dtype]
    print(f"check: output and the gradient of every float input (where the row has them) allclose to the fp32 "
          f"torch reference, rtol {rtol:g} atol {atol:g} (atol x max|ref| per tensor); max err: max abs "
          f"difference. GB/s: minimal bytes (cln_bytes) / median time")


if __name__ == "__main__":
    from common import bench_main

    bench_main(__doc__, run, print_table)
