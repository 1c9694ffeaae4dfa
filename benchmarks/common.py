"""Helpers shared by the benches: threads, timing, equivalence checks, tables, a progress bar."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
from torch.utils.benchmark import Timer

# (rtol, atol). fp32: the two sides sum in different orders, so allow rounding; fp64: so
# little is allowed that any algorithmic difference shows. See compare() for the atol scale.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-11)}
# Op benches also check bf16 rows: 8 bits of mantissa, ~4e-3 relative per rounding, several roundings deep.
CHECK_TOLERANCES = {**TOLERANCES, torch.bfloat16: (2e-2, 2e-2)}


def available_cpus() -> int:
    """The CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_threads() -> int:
    n = available_cpus()
    torch.set_num_threads(n)
    return n


def progress(iterable: Iterable, desc: str, total: int = None) -> Iterable:
    """A tqdm bar over ``iterable`` when tqdm is installed (shown on a terminal only), else the iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    # disable=None: no bar when stderr is not a terminal, so logs of `make bench` stay clean.
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None)


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> Dict[str, float]:
    """Median wall time of ``fn()`` in ms, measured by ``torch.utils.benchmark.Timer``.

    The Timer synchronizes the accelerator around each timed block, and its block-size
    estimate warms up too; the explicit warm-up first takes cuBLAS/allocator start-up
    out of that estimate.
    """
    cuda = device.type == "cuda"
    for _ in range(3 if cuda else 1):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    # CPU runs are slow and must fit a few minutes on 2 cores: fewer replicates there.
    min_run_time = {(False, True): 0.05, (False, False): 0.5, (True, True): 0.2, (True, False): 1.0}[(cuda, quick)]
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": len(m.times) * m.number_per_run}


def compare(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
            rtol: float, atol: float) -> Tuple[bool, float, str]:
    """(all close, max abs error, name of the worst tensor) over tensors with the same names.

    atol is scaled by each tensor's largest |entry| (when above 1): a weight gradient sums
    B*L terms, so its rounding error follows the size of those terms, and a small entry of a
    large gradient carries it too. Without the scale, fp32 rounding alone fails a gradient
    where camtl is closer to the fp64 result than the published code is.
    """
    if set(ref) != set(got):
        raise KeyError(f"compare: different tensors: {sorted(set(ref) ^ set(got))}")
    ok, worst, worst_name = True, 0.0, ""
    for name, r in ref.items():
        g = got[name]
        if r.shape != g.shape:
            return False, float("inf"), f"{name} (shape {tuple(g.shape)} != {tuple(r.shape)})"
        if r.numel() == 0:
            continue
        err = (g - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        ok = ok and torch.allclose(g, r, rtol=rtol, atol=atol * scale)
        if not err <= worst:  # also catches NaN
            worst, worst_name = err, name
    return ok, worst, worst_name


@dataclass(frozen=True)
class Impl:
    """One row of an op bench: a function of the inputs, checked against a reference, then timed."""
    key: str
    name: str
    fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor]  # inputs -> output
    leaves: Tuple[str, ...]  # the inputs it differentiates (and is checked on)
    # Entered once around the check and the Timer (same thread), not per call: no per-call cost in the timings.
    context: Callable[[], ContextManager] = contextlib.nullcontext
    comparable: bool = True  # False: it computes something else (no bias), nothing to check
    note: str = ""


def grad_step(fn, leaves, x, grad_out) -> Dict[str, torch.Tensor]:
    """Forward, and backward when there are leaves: the output and their gradients, by name."""
    out = fn(x)
    if not leaves:
        return {"output": out}
    # autograd.grad, not .backward(): no .grad accumulation inside the timed loop.
    grads = torch.autograd.grad(out, [x[k] for k in leaves], grad_out)
    return {"output": out, **{f"d{k}": g for k, g in zip(leaves, grads)}}


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def check_impl(impl: Impl, x, ref, grad_out, dtype) -> dict:
    """The check of one row against the fp32 reference ``ref`` (grad_step's outputs), inside impl.context:
    {"pass", "max_err", "worst", "checked", "check"}, or {"check": note} for a row with nothing to compare."""
    with impl.context():
        got = grad_step(impl.fn, impl.leaves, x, grad_out)
    if not impl.comparable:
        return {"check": impl.note}
    want = {k: ref[k] for k in got}
    ok, err, worst = compare(want, {k: t.float() for k, t in got.items()}, *CHECK_TOLERANCES[dtype])
    return {"pass": ok, "max_err": err, "worst": worst, "checked": ",".join(got),
            "check": ("ok" if ok else "FAIL") + (f", {impl.note}" if impl.note else "")}


def bench_impl(impl: Impl, shape, x, ref, grad_out, dtype, device, quick) -> dict:
    """One row: the check against the fp32 reference ``ref`` (grad_step's outputs), then fwd and fwd+bwd timings.

    A row that fails to run keeps its error message; it fails the bench only for camtl
    (the code under test): a baseline the installed torch cannot run is not camtl's failure.
    """
    row = {"impl": impl.key, "name": impl.name, "shape": str(shape), "device": str(device), "dtype": str(dtype)[6:]}
    try:
        row.update(check_impl(impl, x, ref, grad_out, dtype))
        with impl.context():
            fwd = time_ms(lambda: impl.fn(x), device, quick)
            row["fwd_ms"], row["fwd_iqr_ms"] = fwd["median_ms"], fwd["iqr_ms"]
            if impl.leaves:
                fwd_bwd = time_ms(lambda: grad_step(impl.fn, impl.leaves, x, grad_out), device, quick)
                row["fwd_bwd_ms"], row["fwd_bwd_iqr_ms"] = fwd_bwd["median_ms"], fwd_bwd["iqr_ms"]
    except Exception as exc:  # noqa: BLE001  (any failure of a baseline is a result to report)
        row["error"] = error_text(exc)
        row["check"] = "error"
        if impl.key == "camtl":
            row["pass"] = False
        else:
            row.pop("pass", None)  # it may have checked fine and then failed to time
    return row


def tolerance_text(dtype) -> str:
    rtol, atol = CHECK_TOLERANCES[dtype]
    return f"rtol {rtol:g}, atol {atol:g} x max|ref| per tensor, vs the fp32 reference"


def op_entries(impls: Sequence[Impl], x, ref, grad_out, dtype, under_test: Sequence[str] = ("camtl",)) -> list:
    """suite.Entry rows of an op bench: each impl checked (output and every gradient) before its fwd and fwd+bwd
    entries exist; a row that fails its check gets entries that are not timed and fail their tests."""
    from suite import Entry

    entries = []
    for impl in impls:
        common = dict(context=impl.context, tolerance=tolerance_text(dtype), under_test=impl.key in under_test)
        try:
            check = check_impl(impl, x, ref, grad_out, dtype)
            common.update(matches_reference=check.get("pass"), max_err=check.get("max_err"))
        except Exception as exc:  # noqa: BLE001
            common["error"] = error_text(exc)
        name = impl.name + (f" ({impl.note})" if impl.note else "")
        entries.append(Entry(impl.key, name, "fwd", lambda impl=impl: impl.fn(x), **common))
        if impl.leaves:
            entries.append(Entry(impl.key, name, "fwd+bwd",
                                 lambda impl=impl: grad_step(impl.fn, impl.leaves, x, grad_out), **common))
    return entries


Column = Tuple[str, str, str]  # (header, row key, format spec)
# The columns of bench_impl's rows.
IMPL_COLUMNS: List[Column] = [
    ("implementation", "name", ""),
    ("check", "check", ""),
    ("max err", "max_err", ".2e"),
    ("fwd ms", "fwd_ms", ".3f"),
    ("fwd+bwd ms", "fwd_bwd_ms", ".3f"),
]


def print_table(title: str, rows: Sequence[Mapping], columns: Sequence[Column]) -> None:
    """A plain-text table, one line per row; a missing value prints as '-'."""
    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "ok" if value else "FAIL"
        return format(value, spec)

    table: List[List[str]] = [[h for h, _, _ in columns]]
    table += [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print(f"\n{title}")
    for i, line in enumerate(table):
        # The first column (a name) is left-aligned, numbers right-aligned.
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def bench_main(doc: str, run: Callable, print_table: Callable, threads_option: bool = False) -> None:
    """The command line of a GPU bench: ``[--quick] [--threads N] [--cpu-smoke]``; exits 1 if a check failed.

    ``--cpu-smoke`` runs the bench's CUDA code path on the CPU (the bench sets TRITON_INTERPRET=1 before
    triton loads when it sees that flag): a test of the bench, not a measurement.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes or fewer repetitions")
    if threads_option:
        parser.add_argument("--threads", type=int, metavar="N", help="torch threads (default: every available CPU)")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.cpu_smoke else "cuda" if torch.cuda.is_available() else "cpu")
    if args.cpu_smoke:
        print("cpu smoke: the CUDA code path on the CPU (Triton interpreter); timings mean nothing")
    rows = run(device, quick=args.quick, smoke=args.cpu_smoke)
    print_table(rows)
    sys.exit(1 if any(r.get("pass") is False for r in rows) else 0)
