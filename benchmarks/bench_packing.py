"""Padding-free CA-MTL on the CPU (issue 11): real tokens per second on a GLUE-shaped multi-task mixture.

The mixture: eight tasks with GLUE's token-length shapes (bert-base-cased means: CoLA 11, SST-2 13, QQP 30,
STS-B 31, MNLI 39, QNLI 50, MRPC 53, RTE 69; lognormal, clipped to [5, max_seq_length]), each example's task
drawn in proportion to GLUE's training-set sizes; batches of 32 examples. The model: the CA-MTL-base layout
at hidden 256, 4 layers, 4 heads, intermediate 1024, BERT's vocabulary, max_seq_length 128; fp32, torch
backend, forward+backward (the loss of bench_model: sum(sequence . w) over the real tokens + sum(pooled . w),
w fixed N(0, 1)); eval mode (dropout off, so that the rows compute the same thing). Rows, all with the same
weights (the published encoder's randomized state dict, as in bench_model):
  - the published algorithm (``camtl.testing.published``), every batch padded to max_seq_length;
  - camtl padded to max_seq_length, camtl dynamically padded (to the batch's longest), camtl packed
    (input_ids [1, N], position_ids restarting at 0, cu_seqlens, task_id [S]);
  - HF ``BertModel`` of the same width, no conditioning, SDPA, dynamically padded: the floor. HF has no
    packed attention with a backward on the CPU (SDPA ignores position_ids restarts and attends across
    sequences; FlexAttention has no CPU backward), so its fastest CPU form is dynamic padding.
Reported: real (non-padding) tokens per second over the batches, median of interleaved rounds (each round
runs every row on every batch), with the best and the spread (max - min) / median of the rounds.

Before timing, on the first batch, each camtl row and the published row are checked against camtl packed in
fp32 (bench_model's tolerances): the loss, the sequence output on the real tokens, the pooled output and
every parameter gradient; a row that differs fails (and fails ``make bench``).

Targets: camtl packed >= 3x the published algorithm's real tokens/s; HF floor <= 1.3x camtl packed. The
ratios are paired by round (the rows of one round ran back to back); a bound inside the range of the
per-round ratios is "not resolved (within noise)" rather than met or missed.

Size: 2 batches, a warm-up round on one batch, then 5 timed rounds: about 1.5 min on 2 cores (measured with
--threads 1 on a shared machine); ``--quick`` (2 layers of hidden 128, one round) about 15 s. Always on the
CPU, also under `make gpu-check`. On a shared machine the multi-threaded medians swing by several times (the
table says so); ``--threads 1`` is the steadier comparison there.

    python benchmarks/bench_packing.py [--quick] [--threads N]
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

import camtl
from bench_model import Shape, build, busy_cpus, published_weights
from common import TOLERANCES, compare, error_text, progress
from common import print_table as _print_table

# (name, mean tokens, GLUE training-set size)
TASKS = [("CoLA", 11, 8_551), ("SST-2", 13, 67_349), ("QQP", 30, 363_846), ("STS-B", 31, 5_749),
         ("MNLI", 39, 392_702), ("QNLI", 50, 104_743), ("MRPC", 53, 3_668), ("RTE", 69, 2_490)]
LENGTH_SIGMA = 0.5  # lognormal shape of each task's lengths: a long tail, as GLUE's
MIN_LEN = 5
SHAPES = {False: Shape("CA-MTL-base layout, hidden 256", 32, 128, 4, 256, 4, 1024, 30522),
          True: Shape("quick", 32, 128, 2, 128, 2, 512, 30522)}
SMOKE_SHAPE = Shape("smoke", 8, 32, 2, 32, 2, 64, 512)  # tests/test_bench_packing.py: a test of this file
BATCHES = {False: 2, True: 2}
ROUNDS = {False: 5, True: 1}  # timed rounds, after a warm-up round on the first batch
TARGET_PUBLISHED = 3.0  # camtl packed real tokens/s >= 3x published
TARGET_HF = 1.3  # HF floor real tokens/s <= 1.3x camtl packed
BUSY_CPUS_SHARED = 0.3  # as bench_model: CPUs busy with other processes from which timings are unreliable
SPREAD_SHARED_PCT = 50  # a row whose rounds differ by more than this was disturbed


def sample_mixture(n_examples: int, max_len: int, generator: torch.Generator):
    """(task ids, lengths): tasks in proportion to GLUE's sizes, lengths lognormal with each task's mean."""
    sizes = torch.tensor([float(t[2]) for t in TASKS])
    tasks = torch.multinomial(sizes / sizes.sum(), n_examples, replacement=True, generator=generator)
    means = torch.tensor([float(t[1]) for t in TASKS])[tasks]
    mu = means.log() - LENGTH_SIGMA ** 2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    lengths = (mu + LENGTH_SIGMA * torch.randn(n_examples, generator=generator)).exp().round()
    return tasks, lengths.clamp(MIN_LEN, max_len).long()


@dataclass
class Batch:
    """One batch of the mixture in its three layouts; the loss weights of the real tokens (w_tok) are shared."""
    tasks: torch.Tensor  # [S]
    lengths: torch.Tensor  # [S]
    packed: Dict[str, object]
    w_tok: torch.Tensor  # [N, D]
    w_pool: torch.Tensor  # [S, D]

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    def padded(self, L: int) -> Dict[str, torch.Tensor]:
        """The batch padded to L (0 = [PAD]), its attention_mask, and w_tok scattered to [S, L, D] (0 on padding)."""
        S = len(self.lengths)
        mask = torch.arange(L)[None, :] < self.lengths[:, None]
        out = {}
        for key in ("input_ids", "token_type_ids"):
            full = torch.zeros(S, L, dtype=torch.long)
            full[mask] = self.packed[key][0]
            out[key] = full
        w_seq = torch.zeros(S, L, self.w_tok.shape[1])
        w_seq[mask] = self.w_tok
        out.update(attention_mask=mask.long(), w_seq=w_seq, mask=mask)
        return out


def make_batches(shape: Shape, n_batches: int, seed: int = 0) -> List[Batch]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        tasks, lengths = sample_mixture(shape.B, shape.L, g)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        N = int(cu[-1])
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        position_ids = torch.arange(N) - starts
        token_type_ids = (position_ids >= torch.repeat_interleave(lengths // 2, lengths)).long()  # a pair, split at half
        packed = {"input_ids": torch.randint(1, shape.vocab, (1, N), generator=g),
                  "token_type_ids": token_type_ids[None], "position_ids": position_ids[None],
                  "cu_seqlens": cu, "max_seqlen": int(lengths.max()), "task_id": tasks}
        batches.append(Batch(tasks, lengths, packed, torch.randn(N, shape.hidden, generator=g),
                             torch.randn(len(lengths), shape.hidden, generator=g)))
    return batches


@dataclass(frozen=True)
class Impl:
    key: str
    name: str
    kind: str  # "published", "camtl" or "hf" (bench_model.build)
    layout: str  # "max" (padded to max_seq_length), "dynamic" (to the batch's longest) or "packed"


IMPLS = [
    Impl("published", "published algorithm, padded to 128", "published", "max"),
    Impl("camtl_max", "camtl, padded to 128", "camtl", "max"),
    Impl("camtl_dynamic", "camtl, dynamically padded", "camtl", "dynamic"),
    Impl("camtl_packed", "camtl, packed", "camtl", "packed"),
    Impl("hf", "HF BertModel (SDPA), dyn. padded, no cond.", "hf", "dynamic"),
]
CAMTL_KEYS = ("camtl_max", "camtl_dynamic", "camtl_packed")


def make_step(impl: Impl, model: torch.nn.Module, batch: Batch, L: int) -> Callable[[], tuple]:
    """fwd + bwd on one batch in the row's layout: (loss, sequence output on the real tokens [N, D], pooled [S, D])."""
    if impl.layout == "packed":
        p = batch.packed

        def step():
            model.zero_grad(set_to_none=True)
            out = model(p["input_ids"], token_type_ids=p["token_type_ids"], position_ids=p["position_ids"],
                        cu_seqlens=p["cu_seqlens"], max_seqlen=p["max_seqlen"], task_id=p["task_id"])
            sequence, pooled = out[0][0], out[1]
            loss = (sequence * batch.w_tok).sum() + (pooled * batch.w_pool).sum()
            loss.backward()
            return loss, sequence, pooled
        return step

    b = batch.padded(L if impl.layout == "max" else int(batch.lengths.max()))

    def step():
        model.zero_grad(set_to_none=True)
        if impl.kind == "published":
            out = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], batch.tasks)
        elif impl.kind == "camtl":
            out = model(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                        task_id=batch.tasks)
        else:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        token_type_ids=b["token_type_ids"])
        sequence, pooled = out[0], out[1]
        loss = (sequence * b["w_seq"]).sum() + (pooled * batch.w_pool).sum()
        loss.backward()
        return loss, sequence[b["mask"]], pooled
    return step


def outputs_and_grads(step: Callable[[], tuple], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    loss, sequence, pooled = step()
    out = {"loss": loss.detach(), "sequence": sequence.detach(), "pooled": pooled.detach()}
    for name, p in model.named_parameters():
        out[f"d {name}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    model.zero_grad(set_to_none=True)
    return out


def _fail(row: dict, exc: BaseException) -> None:
    """A row that cannot run keeps its error; it fails the bench for camtl rows (the code under test)."""
    row["error"], row["check"] = error_text(exc), "error"
    if row["impl"] in CAMTL_KEYS:
        row["pass"] = False
    else:
        row.pop("pass", None)


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run(device: torch.device, quick: bool, smoke: bool = False, rounds: int = None, batches: int = None) -> List[dict]:
    """Always on the CPU (``device`` is ignored): the GPU rows are issue 11's deliverable 5, not this bench.
    ``rounds``, ``batches``: timed rounds and batches (default ROUNDS[quick] and BATCHES[quick]; 1 and 1 for the
    smoke)."""
    shape = SMOKE_SHAPE if smoke else SHAPES[quick]
    n_batches, default_rounds = (1, 1) if smoke else (BATCHES[quick], ROUNDS[quick])
    n_batches, rounds = batches or n_batches, rounds or default_rounds
    batches = make_batches(shape, n_batches)
    real = sum(b.real_tokens for b in batches)
    mean_len = real / sum(len(b.lengths) for b in batches)
    base = {"shape": str(shape), "device": "cpu", "dtype": "float32", "batches": n_batches,
            "real_tokens": real, "mean_length": mean_len,
            "real_fraction_max": real / (n_batches * shape.B * shape.L),
            "real_fraction_dynamic": real / sum(len(b.lengths) * int(b.lengths.max()) for b in batches)}
    busy_before = busy_cpus()
    weights = published_weights(shape)
    rows, models, steps = [], {}, {}
    with camtl.use_backend("torch"):
        for impl in IMPLS:
            row = {"impl": impl.key, "name": impl.name, **base}
            rows.append(row)
            try:
                models[impl.key] = build(impl.kind, shape, weights, torch.device("cpu"))
                steps[impl.key] = [make_step(impl, models[impl.key], b, shape.L) for b in batches]
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc)
        # The check: every camtl row and the published one against camtl packed, on the first batch.
        by_key = {r["impl"]: r for r in rows}
        ref = None
        if "camtl_packed" in steps:
            try:
                ref = outputs_and_grads(steps["camtl_packed"][0], models["camtl_packed"])
                by_key["camtl_packed"]["check"] = "reference"
            except Exception as exc:  # noqa: BLE001
                _fail(by_key["camtl_packed"], exc)
        for impl in IMPLS:
            row = by_key[impl.key]
            if impl.kind == "hf":
                row["check"] = "n/a"
                continue
            if impl.key == "camtl_packed" or impl.key not in steps:
                continue
            if ref is None:
                row["check"] = "no reference"
                continue
            try:
                got = outputs_and_grads(steps[impl.key][0], models[impl.key])
                ok, err, worst = compare(ref, got, *TOLERANCES[torch.float32])
                row.update({"pass": ok, "max_err": err, "worst": worst, "check": "ok" if ok else "FAIL"})
            except Exception as exc:  # noqa: BLE001
                _fail(row, exc)
        del ref
        if by_key["camtl_packed"].get("pass") is not False and any(
                r.get("pass") is False for r in rows if r["impl"] != "camtl_packed"):
            by_key["camtl_packed"]["pass"] = False  # the reference disagrees with a row: packed is suspect too
        # Interleaved rounds: every row on every batch, then the next round; round 0 warms up on one batch.
        seconds: Dict[str, List[float]] = {k: [] for k in steps}
        for round_ in progress(range(rounds + 1), "bench_packing rounds", total=rounds + 1):
            for impl in IMPLS:
                if impl.key not in steps:
                    continue
                try:
                    started = time.perf_counter()
                    for step in steps[impl.key][:1] if round_ == 0 else steps[impl.key]:
                        step()
                    seconds[impl.key].append(time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001
                    _fail(by_key[impl.key], exc)
                    del steps[impl.key]
    for row in rows:
        ts = seconds.get(row["impl"], [])[1:]
        if row["impl"] in steps and ts:
            rates = [real / t for t in ts]
            median = _median(rates)
            row.update({"tokens_per_s": median, "best_tokens_per_s": max(rates), "tokens_per_s_rounds": rates,
                        "fwd_bwd_ms": 1e3 * _median(ts) / n_batches, "fwd_bwd_rounds_ms": [1e3 * t / n_batches
                                                                                          for t in ts],
                        "rounds": len(ts), "spread_pct": 100 * (max(rates) - min(rates)) / median})
    add_targets(rows)
    rows[0].update({"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "busy_cpus_before": busy_before, "busy_cpus_after": busy_cpus()})
    return rows


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    numerator: str  # row keys: ratio = numerator's tokens/s / denominator's, per round
    denominator: str
    bound: float
    at_least: bool


TARGETS = [
    Target("published", f"camtl packed >= {TARGET_PUBLISHED:g}x the published algorithm's real tokens/s",
           "camtl_packed", "published", TARGET_PUBLISHED, True),
    Target("hf", f"HF floor <= {TARGET_HF:g}x camtl packed's real tokens/s", "hf", "camtl_packed", TARGET_HF, False),
]


def add_targets(rows: List[dict]) -> None:
    """On rows[0]: target_<key> (the ratio of the medians), its per-round range, and target_<key>_met: True,
    False, or None when the bound lies inside the range of the per-round ratios (not resolved) or a row is missing."""
    by_key = {r["impl"]: r for r in rows}
    head = rows[0]
    for t in TARGETS:
        a, b = by_key[t.numerator], by_key[t.denominator]
        if not a.get("tokens_per_s") or not b.get("tokens_per_s"):
            head[f"target_{t.key}"], head[f"target_{t.key}_met"] = None, None
            continue
        value = a["tokens_per_s"] / b["tokens_per_s"]
        head[f"target_{t.key}_best"] = a["best_tokens_per_s"] / b["best_tokens_per_s"]
        per_round = [x / y for x, y in zip(a["tokens_per_s_rounds"], b["tokens_per_s_rounds"])]
        low, high = min(per_round), max(per_round)
        unresolved = low <= t.bound <= high and len(per_round) > 1
        head.update({f"target_{t.key}": value, f"target_{t.key}_low": low, f"target_{t.key}_high": high,
                     f"target_{t.key}_unresolved": unresolved,
                     f"target_{t.key}_met": None if unresolved else (value >= t.bound if t.at_least
                                                                    else value <= t.bound)})


COLUMNS = [
    ("implementation", "name", ""),
    ("check", "check", ""),
    ("max err", "max_err", ".2e"),
    ("real tok/s", "tokens_per_s", ",.0f"),
    ("best tok/s", "best_tokens_per_s", ",.0f"),
    ("spread %", "spread_pct", ".0f"),
    ("ms/batch", "fwd_bwd_ms", ".0f"),
]


def print_table(rows: List[dict]) -> None:
    head = rows[0]
    _print_table(f"Packed CA-MTL, fwd+bwd, float32 on the CPU (torch backend), {head['shape']}, GLUE-shaped mixture: "
                 f"{head['batches']} batches, {head['real_tokens']} real tokens, mean length "
                 f"{head['mean_length']:.1f}; real tokens are {100 * head['real_fraction_max']:.0f}% of the padded-"
                 f"to-128 positions, {100 * head['real_fraction_dynamic']:.0f}% of the dynamically padded ones",
                 rows, COLUMNS)
    for r in rows:
        if "error" in r:
            print(f"  {r['name']}: {r['error']}")
        elif r.get("pass") is False and "worst" in r:
            print(f"  FAIL {r['name']}: worst {r['worst']} (max abs err {r['max_err']:.2e})")
    busy = [head.get(k) for k in ("busy_cpus_before", "busy_cpus_after")]
    spread = max((r.get("spread_pct", 0) for r in rows), default=0)
    # One thread does not wait on others at a barrier: a busy CPU then shows only in the spread.
    shared = spread > SPREAD_SHARED_PCT or (None not in busy and max(busy) >= BUSY_CPUS_SHARED
                                            and head["threads"] > 1)
    for t in TARGETS:
        v = head.get(f"target_{t.key}")
        if v is None:
            verdict = "n/a (a row has no measurement)"
        elif head.get(f"target_{t.key}_unresolved"):
            verdict = "not resolved (within noise)"
        else:
            verdict = "met" if head[f"target_{t.key}_met"] else "MISSED"
        span = "" if v is None else (f" ({v:.2f}x; per round {head[f'target_{t.key}_low']:.2f}"
                                     f"-{head[f'target_{t.key}_high']:.2f}x)")
        if v is not None:
            span += f"; best vs best {head[f'target_{t.key}_best']:.2f}x"
        print(f"  target: {t.text}: {verdict}{span}" + (", UNRELIABLE: the CPU is shared (below)" if shared else ""))
    if None not in busy:
        print(f"  {head['threads']} torch threads; CPUs kept busy by other processes (of {head['cpus']}), sampled 1 s "
              f"before and after: {busy[0]:.1f}, {busy[1]:.1f}; largest spread {spread:.0f}%")
    if shared:
        print("  other processes took CPUs during the rounds (threads stall at every op's barrier): the medians are "
              "unreliable, best vs best is the least disturbed estimate; rerun on an idle machine or with --threads 1")
    rtol, atol = TOLERANCES[torch.float32]
    print(f"check: on the first batch, each row against camtl packed in fp32: loss, sequence output on the real "
          f"tokens, pooled output, every parameter gradient allclose, rtol {rtol:g} atol {atol:g} (atol x max|ref| "
          f"per tensor). real tok/s: median of {max((r.get('rounds', 0) for r in rows), default=0)} interleaved "
          f"round(s); spread: (max - min) / median")


if __name__ == "__main__":
    from common import bench_main

    bench_main(__doc__, run, print_table, threads_option=True)
