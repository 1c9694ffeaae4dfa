"""camtl.nn drop-in modules against the published algorithm (camtl.testing.published).

For each module the published version is built and its parameters randomized,
its state dict is loaded (strict) into the camtl module, both are checked equal
(outputs and the gradients of inputs and parameters, in fp32 at the bench shape
and in fp64 at a smaller one), then forward and forward+backward are timed.
camtl runs under ``camtl.use_backend("torch")``: this bench measures the
algorithm (no loops over tasks or examples), not kernels.

    python benchmarks/bench_modules.py [--quick]
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

import camtl
from camtl.nn import CBDA, ConditionalBottleNeck, ConditionalLayerNorm, ConditionalSelfAttention, FiLM
from camtl.testing.published import (PublishedCBDA, PublishedConditionalBottleNeck,
                                     PublishedConditionalLayerNorm, PublishedFiLM, PublishedSelfAttention)

from common import TOLERANCES, compare, progress, time_ms
from common import print_table as _print_table

NUM_TASKS = 8
PARAM_NOISE = 0.02  # BERT's init std; breaks the zero/one inits (FiLM bias, LN bias, random_weight_matrix)


@dataclass(frozen=True)
class Shape:
    B: int
    L: int
    D: int
    H: int

    def __str__(self):
        return f"B={self.B} L={self.L} D={self.D} H={self.H}"

    def config(self):
        # max_seq_length = L: the published CBDA has no cropping, its bias is max_seq_length wide.
        return types.SimpleNamespace(hidden_size=self.D, num_attention_heads=self.H, max_seq_length=self.L,
                                     attention_probs_dropout_prob=0.0, output_attentions=False)


# (timed fp32 shape, fp64 check shape). The fp64 shape has B > NUM_TASKS so tasks repeat in the batch.
SHAPES = {False: (Shape(32, 128, 768, 12), Shape(16, 128, 768, 12)),  # BERT-base
          True: (Shape(8, 64, 384, 6), Shape(16, 64, 384, 6))}


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    """Every input any module takes; the float ones are leaves that need a gradient.

    The task condition is a lookup into ``task_table`` (an nn.Embedding(8, D) weight, N(0, 1)
    as nn.Embedding inits it), done inside the timed forward, so rows of a task are equal
    and the table gets the gradient, as in training.
    """
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same inputs on every device
    B, L, D = shape.B, shape.L, shape.D
    blocks = D // L
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    keep = (torch.arange(L)[None, :] < lengths[:, None]).to(torch.float64)
    floats = {
        "hidden": torch.randn(B, L, D, generator=g, dtype=torch.float64),
        "task_table": torch.randn(NUM_TASKS, D, generator=g, dtype=torch.float64),
        # CBDA's x_to_film: a [L, ceil(L / blocks)] matrix, like random_weight_matrix.
        "block_table": PARAM_NOISE * torch.randn(L, math.ceil(L / blocks), generator=g, dtype=torch.float64),
    }
    out = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in floats.items()}
    out["task_id"] = (torch.arange(B) % NUM_TASKS).to(device)
    out["attention_mask"] = ((1.0 - keep) * -10000.0)[:, None, None, :].to(device=device, dtype=dtype)
    return out


def _cond(x):
    return F.embedding(x["task_id"], x["task_table"])


@dataclass(frozen=True)
class Case:
    name: str
    published: Callable[[types.SimpleNamespace], nn.Module]
    camtl: Callable[[types.SimpleNamespace], nn.Module]
    forward: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]  # the same call for both modules
    leaves: tuple  # the inputs whose gradient is checked and computed


def _cbda_args(c):
    blocks = c.hidden_size // c.max_seq_length
    return c.hidden_size, math.ceil(c.max_seq_length / blocks), blocks


CASES = [
    Case("FiLM", lambda c: PublishedFiLM(c.hidden_size, c.hidden_size), lambda c: FiLM(c.hidden_size, c.hidden_size),
         lambda m, x: m(_cond(x), x["hidden"]), ("hidden", "task_table")),
    Case("CBDA", lambda c: PublishedCBDA(*_cbda_args(c)), lambda c: CBDA(*_cbda_args(c)),
         lambda m, x: m(_cond(x), x["block_table"]), ("block_table", "task_table")),
    Case("ConditionalLayerNorm", lambda c: PublishedConditionalLayerNorm(c.hidden_size, c.hidden_size),
         lambda c: ConditionalLayerNorm(c.hidden_size, c.hidden_size),
         lambda m, x: m(x["hidden"], _cond(x), x["task_id"]), ("hidden", "task_table")),
    Case("ConditionalBottleNeck", PublishedConditionalBottleNeck, ConditionalBottleNeck,
         lambda m, x: m(_cond(x), x["hidden"]), ("hidden", "task_table")),
    Case("ConditionalSelfAttention", PublishedSelfAttention, ConditionalSelfAttention,
         lambda m, x: m(x["hidden"], attention_mask=x["attention_mask"], task_embedding=_cond(x))[0],
         ("hidden", "task_table")),
]


def build_pair(case: Case, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    """(published, camtl) modules with equal randomized parameters, in eval mode (dropout off)."""
    torch.manual_seed(seed)
    published = case.published(shape.config())
    with torch.no_grad():
        for p in published.parameters():
            p.add_(PARAM_NOISE * torch.randn_like(p))
    published = published.to(device=device, dtype=dtype).eval()
    ours = case.camtl(shape.config()).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(published.state_dict(), strict=True)
    return published, ours


def _step(case: Case, module: nn.Module, x: Dict[str, torch.Tensor], grad_out: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Forward and backward: the output and the gradients of the leaf inputs and the parameters, by name."""
    out = case.forward(module, x)
    params = dict(module.named_parameters())
    wrt = [x[k] for k in case.leaves] + list(params.values())
    # autograd.grad, not .backward(): no .grad accumulation inside the timed loop.
    grads = torch.autograd.grad(out, wrt, grad_out)
    return {"output": out, **dict(zip([f"d {k}" for k in case.leaves] + [f"d {k}" for k in params], grads))}


def check(case: Case, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Compare camtl with published (output and every gradient) at ``shape`` in ``dtype``.

    Returns ((pass, max abs error, worst tensor), (published, camtl, inputs, grad_out)):
    the second part is what the timings reuse.
    """
    published, ours = build_pair(case, shape, dtype, device, seed)
    x = make_inputs(shape, dtype, device, seed)
    with torch.no_grad():
        grad_out = torch.randn_like(case.forward(published, x))
    ref = _step(case, published, x, grad_out)
    with camtl.use_backend("torch"):
        got = _step(case, ours, x, grad_out)
    return compare(ref, got, *TOLERANCES[dtype]), (published, ours, x, grad_out)


def bench_case(case: Case, shape: Shape, shape64: Shape, device: torch.device, quick: bool) -> dict:
    """One row: fp64 and fp32 equivalence, then fwd and fwd+bwd timings of both modules in fp32."""
    (ok64, err64, worst64), _ = check(case, shape64, torch.float64, device)
    (ok32, err32, worst32), (published, ours, x, grad_out) = check(case, shape, torch.float32, device)
    row = {"module": case.name, "shape": str(shape), "device": str(device), "dtype": "float32",
           "fp64_shape": str(shape64), "pass": ok32 and ok64,
           "pass_fp32": ok32, "max_err_fp32": err32, "worst_fp32": worst32,
           "pass_fp64": ok64, "max_err_fp64": err64, "worst_fp64": worst64}

    for side, module in (("published", published), ("camtl", ours)):
        with camtl.use_backend("torch"):  # entered once around the Timer: same thread, so the Timer's calls see it
            fwd = time_ms(lambda: case.forward(module, x), device, quick)
            fwd_bwd = time_ms(lambda: _step(case, module, x, grad_out), device, quick)
        row[f"{side}_fwd_ms"], row[f"{side}_fwd_bwd_ms"] = fwd["median_ms"], fwd_bwd["median_ms"]
        row[f"{side}_fwd_iqr_ms"], row[f"{side}_fwd_bwd_iqr_ms"] = fwd["iqr_ms"], fwd_bwd["iqr_ms"]
    row["fwd_speedup"] = row["published_fwd_ms"] / row["camtl_fwd_ms"]
    row["fwd_bwd_speedup"] = row["published_fwd_bwd_ms"] / row["camtl_fwd_bwd_ms"]
    return row


def run(device: torch.device, quick: bool) -> List[dict]:
    shape, shape64 = SHAPES[quick]
    return [bench_case(case, shape, shape64, device, quick) for case in progress(CASES, "bench_modules")]


COLUMNS = [
    ("module", "module", ""),
    ("pass", "pass", ""),
    ("pub fwd ms", "published_fwd_ms", ".3f"),
    ("camtl fwd ms", "camtl_fwd_ms", ".3f"),
    ("speedup", "fwd_speedup", ".2f"),
    ("pub f+b ms", "published_fwd_bwd_ms", ".3f"),
    ("camtl f+b ms", "camtl_fwd_bwd_ms", ".3f"),
    ("speedup", "fwd_bwd_speedup", ".2f"),
    ("max err fp32", "max_err_fp32", ".2e"),
    ("max err fp64", "max_err_fp64", ".2e"),
]


def print_table(rows: List[dict]) -> None:
    head = rows[0] if rows else {}
    _print_table(f"camtl.nn vs published, {head.get('dtype')} on {head.get('device')}, {head.get('shape')}, "
                 f"{NUM_TASKS} tasks (fp64 check at {head.get('fp64_shape')}); camtl backend: torch", rows, COLUMNS)
    (rtol32, atol32), (rtol64, atol64) = TOLERANCES[torch.float32], TOLERANCES[torch.float64]
    print(f"pass: output and gradients of inputs and parameters allclose, fp32 rtol {rtol32:g} atol {atol32:g}, "
          f"fp64 rtol {rtol64:g} atol {atol64:g} (atol x max|ref| per tensor); max err: max abs difference")
    for r in rows:
        if not r["pass"]:
            print(f"  FAIL {r['module']}: fp32 worst {r['worst_fp32']} ({r['max_err_fp32']:.2e}), "
                  f"fp64 worst {r['worst_fp64']} ({r['max_err_fp64']:.2e})")


if __name__ == "__main__":
    import sys

    from common import setup_threads

    setup_threads()
    rows = run(torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick="--quick" in sys.argv)
    print_table(rows)
    sys.exit(0 if all(r["pass"] for r in rows) else 1)
