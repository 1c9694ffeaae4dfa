"""The CA-MTL-base encoder train step: camtl against the published algorithm and a plain HF BertModel.

One step is the forward of a batch with 8 tasks mixed (task_id = arange(B) % 8) and random padding
lengths in [L/2, L], a scalar loss on both outputs (sum(sequence · w_seq) + sum(pooled · w_pool), w fixed
N(0, 1), so every output gets an O(1) gradient), its backward, and on the GPU an AdamW step (fused, the
same for every row). Dropout is off (eval mode) so that outputs are comparable; gradients are on. Rows:
  - camtl ``CaMtlBaseEncoder`` with the best backend (``camtl.use_backend("auto")``; the row names the
    backend each op actually ran on), and with the torch backend (vectorized, no kernels);
  - the published algorithm: ``camtl.testing.published.PublishedCaMtlEncoder``, per-example
    ``block_diag`` and per-task layer-norm loops included, with the same weights (its randomized state
    dict is loaded strict into every camtl row);
  - a plain HF ``transformers.BertModel`` of the same size with attn_implementation="sdpa": no
    conditioning, the speed and memory bound (nothing to check: "n/a").
Each camtl row is checked against the published one in fp32 on the timed batch (loss, sequence and
pooled outputs, every parameter gradient) with ``common.compare``.

GPU (CUDA): BERT-base (12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522), B=32, L=128,
bf16 autocast for every row. Reported: fwd+bwd and train-step (+ AdamW) times, their ratios, and the
peak memory of one steady-state train step (``torch.cuda.max_memory_allocated`` above what was allocated
before the row's model was built, reset per row: weights, gradients, AdamW state and activations). The
issue's targets are printed: camtl step >= 5x faster than published, <= 1.25x the HF step, peak memory
<= 1.15x the HF peak.

CPU: fp32, fwd+bwd only (no AdamW, which would be the same for every row; issue 5's CPU target, 1.15x the
published algorithm, is retired: benchmarks/test_model.py judges the conditioning overhead instead). BERT-base
width (hidden 768, 12 heads, intermediate 3072, vocab 30522, L=128) but 4 layers (2 plain, 1 with conditional
layer norms, the adapter top layer: the base layout's mix) and B=8 (one example per task), so that the whole
bench takes about a minute and a half on 2 idle cores; ``--quick`` shrinks it to 2 layers of hidden 384, L=64,
B=8, one round. The published loops are timed: the whole ``PublishedCaMtlEncoder`` forward and backward. A CPU
step takes seconds and this machine's timings jitter by +-15%: after a warm-up round, each row is timed for
one step in each of 7 interleaved rounds, and the median is reported (it decides the target), with the best
and the spread (max - min) / median. On the CPU auto resolves to the torch backend, so the two camtl rows run
the same code: their difference measures the noise, and a target whose ratio lies within it is reported as not
resolved rather than met or missed. The table ends with how many CPUs other processes kept busy around the
bench: on a shared machine the torch threads stall at every op's barrier, which inflates op-heavy rows (the
published one most) by several times; ``--threads 1`` is the fair comparison there.

``--cpu-smoke`` runs the GPU code path on the CPU at a tiny shape (the Triton interpreter for the best
row, bf16 autocast, AdamW, the GPU targets; no peak memory): a test of this file, not a benchmark.

    python benchmarks/bench_model.py [--quick] [--threads N]
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:
    # Read by triton when the kernels are defined, so before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

import camtl  # noqa: E402
from camtl import backends as camtl_backends  # noqa: E402
from camtl.models import CaMtlBaseEncoder  # noqa: E402
from camtl.testing.published import PublishedCaMtlEncoder  # noqa: E402

from common import TOLERANCES, compare, error_text, progress, time_ms  # noqa: E402
from common import print_table as _print_table  # noqa: E402

NUM_TASKS = 8
PARAM_NOISE = 0.02  # BERT's init std, added to every weight: breaks the zero/one inits (FiLM biases, CBDA, CLN)
LR = 1e-5  # AdamW; small, so that the weights barely move while a row is timed


@dataclass(frozen=True)
class Shape:
    label: str
    B: int
    L: int  # = max_seq_length (the published CBDA needs it): every batch is padded to L
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int

    def config(self) -> BertConfig:
        return BertConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                          num_attention_heads=self.heads, intermediate_size=self.intermediate,
                          max_position_embeddings=max(512, self.L))

    def __str__(self):
        return (f"{self.label}: {self.layers} layers, hidden {self.hidden}, {self.heads} heads, ff "
                f"{self.intermediate}, vocab {self.vocab}, B={self.B} L={self.L}")


GPU_SHAPE = Shape("BERT-base", 32, 128, 12, 768, 12, 3072, 30522)
CPU_SHAPES = {False: Shape("BERT-base width, 4 layers", 8, 128, 4, 768, 12, 3072, 30522),
              True: Shape("quick", 8, 64, 2, 384, 6, 1536, 30522)}
SMOKE_SHAPE = Shape("smoke", 12, 32, 2, 96, 2, 128, 512)  # 12 examples: all 8 tasks, 4 of them twice
CPU_ROUNDS = {False: 7, True: 1}  # by quick: interleaved rounds of CPU timings (one step each), median reported


# ---- inputs, models, the step -----------------------------------------------------------------------------------

def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """input_ids (0 = [PAD] past each length), attention_mask, two token types, task_id, and the loss weights."""
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same batch on every device
    B, L = shape.B, shape.L
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    pos = torch.arange(L)[None, :]
    keep = pos < lengths[:, None]
    batch = {
        "input_ids": torch.randint(1, shape.vocab, (B, L), generator=g) * keep,
        "attention_mask": keep.long(),
        "token_type_ids": ((pos >= lengths[:, None] // 2) & keep).long(),  # a sentence pair, split at half
        "task_id": torch.arange(B) % NUM_TASKS,
        "w_seq": torch.randn(B, L, shape.hidden, generator=g),
        "w_pool": torch.randn(B, shape.hidden, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def published_weights(shape: Shape) -> Dict[str, torch.Tensor]:
    """The published encoder's randomized state dict (CPU): every row with these weights gets them from here."""
    torch.manual_seed(0)
    config = shape.config()
    config.max_seq_length = shape.L
    model = PublishedCaMtlEncoder(config, NUM_TASKS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PARAM_NOISE * torch.randn_like(p))
    return model.state_dict()


def build(kind: str, shape: Shape, weights: Dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    if kind == "published":
        config = shape.config()
        config.max_seq_length = shape.L
        model = PublishedCaMtlEncoder(config, NUM_TASKS)
        model.load_state_dict(weights, strict=True)
    elif kind == "camtl":
        model = CaMtlBaseEncoder(shape.config(), num_tasks=NUM_TASKS, max_seq_length=shape.L)
        model.load_state_dict(weights, strict=True)
    else:
        torch.manual_seed(0)
        model = BertModel._from_config(shape.config(), attn_implementation="sdpa")
    return model.to(device).eval()  # eval: dropout off; gradients stay on


def forward(kind: str, model, b) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence output, pooled output) of any of the three models."""
    if kind == "published":
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["task_id"])
    if kind == "camtl":
        out = model(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                    task_id=b["task_id"])
    else:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    return out[0], out[1]


def loss_of(sequence: torch.Tensor, pooled: torch.Tensor, b) -> torch.Tensor:
    return (sequence.float() * b["w_seq"]).sum() + (pooled.float() * b["w_pool"]).sum()


def make_step(kind: str, model, b, optimizer=None) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """fwd + bwd (+ the optimizer step): (loss, sequence, pooled); the gradients land in .grad (set to None first)."""
    def step():
        model.zero_grad(set_to_none=True)
        sequence, pooled = forward(kind, model, b)
        loss = loss_of(sequence, pooled, b)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss, sequence, pooled
    return step


def outputs_and_grads(kind: str, model, b) -> Dict[str, torch.Tensor]:
    """One fwd+bwd: the loss, both outputs and every parameter's gradient (zero where autograd gave none), by name."""
    loss, sequence, pooled = make_step(kind, model, b)()
    out = {"loss": loss.detach(), "sequence": sequence.detach(), "pooled": pooled.detach()}
    for name, p in model.named_parameters():
        out[f"d {name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    model.zero_grad(set_to_none=True)
    return out


@contextlib.contextmanager
def record_backends():
    """Yields {op: {backends}}: which backend ran each camtl op inside the block.

    Wraps the registry's functions for the block's duration (best effort: a registry without
    ``_IMPLS`` records nothing and the row is named by the backend asked for).
    """
    used: Dict[str, set] = {}
    registry = getattr(camtl_backends, "_IMPLS", None)
    if not isinstance(registry, dict):
        yield used
        return
    saved = {op: dict(by_backend) for op, by_backend in registry.items()}

    def wrap(op, name, fn):
        def recorded(*args, **kwargs):
            used.setdefault(op, set()).add(name)
            return fn(*args, **kwargs)
        return recorded

    for op, by_backend in registry.items():
        for name, fn in list(by_backend.items()):
            by_backend[name] = wrap(op, name, fn)
    try:
        yield used
    finally:
        for op, by_backend in saved.items():
            registry[op].update(by_backend)


def backends_text(used: Dict[str, set]) -> str:
    """'triton' when every op ran there, else 'triton: a, b; torch: c'."""
    by_backend: Dict[str, List[str]] = {}
    for op, names in sorted(used.items()):
        for name in sorted(names):
            by_backend.setdefault(name, []).append(op)
    if len(by_backend) == 1:
        return next(iter(by_backend))
    return "; ".join(f"{name}: {', '.join(ops)}" for name, ops in sorted(by_backend.items()))


# ---- rows -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Impl:
    key: str
    name: str
    kind: str  # "camtl", "published" or "hf"
    backend: Optional[str] = None  # camtl rows: the backend asked for


def implementations(device: torch.device, smoke: bool) -> List[Impl]:
    # The interpreter is never auto's choice for CPU tensors: the smoke asks for triton by name.
    best = "triton" if smoke else "auto"
    return [
        Impl("published", "published algorithm", "published"),
        Impl("camtl", f"camtl {best}", "camtl", best),
        Impl("torch", "camtl torch backend", "camtl", "torch"),
        Impl("hf", "HF BertModel (SDPA), no cond.", "hf"),
    ]


BUSY_CPUS_SHARED = 0.3  # CPUs busy with other processes from which a multi-threaded CPU timing is unreliable
CAMTL_KEYS = ("camtl", "torch")  # rows of the code under test: an error fails the bench


def _fail(row: dict, exc: BaseException) -> None:
    """A row that cannot run keeps its error; it fails the bench only for camtl (the code under test)."""
    row["error"], row["check"] = error_text(exc), "error"
    if row["impl"] in CAMTL_KEYS:
        row["pass"] = False
    else:
        row.pop("pass", None)  # it may have checked fine and then failed to time


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def row_context(impl: Impl, device: torch.device, autocast: Optional[torch.dtype]) -> contextlib.ExitStack:
    """The row's backend and autocast, entered around its timings (same thread as the Timer's calls)."""
    stack = contextlib.ExitStack()
    if impl.backend:
        stack.enter_context(camtl.use_backend(impl.backend))
    if autocast is not None:
        stack.enter_context(torch.autocast(device.type, dtype=autocast))
    return stack


@dataclass
class Prepared:
    impl: Impl
    row: dict
    model: Optional[torch.nn.Module] = None


def prepare(impl: Impl, shape: Shape, weights, b, ref: Optional[Dict[str, torch.Tensor]], device: torch.device,
            autocast: Optional[torch.dtype]) -> Tuple[Prepared, Optional[Dict[str, torch.Tensor]]]:
    """Builds the row's model and checks it in fp32 against ``ref`` (camtl rows), naming the backends it ran on.

    Returns (the prepared row, the fp32 outputs and gradients when impl is the published reference and
    ``ref`` is None).
    """
    row = {"impl": impl.key, "name": impl.name, "shape": str(shape), "device": str(device),
           "dtype": f"{str(autocast)[6:]} autocast" if autocast else "float32"}
    prep, got = Prepared(impl, row), None
    try:
        prep.model = build(impl.kind, shape, weights, device)
        row["params_m"] = sum(p.numel() for p in prep.model.parameters()) / 1e6
        used: Dict[str, set] = {}
        with row_context(impl, device, None):
            if impl.kind == "published":
                if ref is None:
                    got = outputs_and_grads(impl.kind, prep.model, b)
                row["check"] = "reference"
            elif impl.kind == "camtl" and ref is None:
                row["check"] = "no reference"  # the published row failed: nothing to compare with
            elif impl.kind == "camtl":
                with record_backends() as used:
                    mine = outputs_and_grads(impl.kind, prep.model, b)
                ok, err, worst = compare(ref, mine, *TOLERANCES[torch.float32])
                row.update({"pass": ok, "max_err": err, "worst": worst, "check": "ok" if ok else "FAIL"})
                del mine
            else:
                row["check"] = "n/a"
        if impl.kind == "camtl" and autocast is not None:
            with row_context(impl, device, autocast), record_backends() as used:  # what the timings will run
                make_step(impl.kind, prep.model, b)()
        if used:
            row["backends"] = backends_text(used)
            if impl.backend == "auto":
                row["name"] = f"{impl.name} ({row['backends']})"
    except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is a result to report)
        _fail(row, exc)
        prep.model = None
    return prep, got


def time_gpu_row(prep: Prepared, b, device: torch.device, autocast, quick: bool, base: int) -> None:
    """fwd+bwd and train-step (+ AdamW) timings, and one steady-state step's peak memory above ``base`` (CUDA)."""
    impl, row, model = prep.impl, prep.row, prep.model
    optimizer = None
    try:
        with row_context(impl, device, autocast):
            timed = time_ms(make_step(impl.kind, model, b), device, quick)
            row["fwd_bwd_ms"], row["fwd_bwd_iqr_ms"] = timed["median_ms"], timed["iqr_ms"]
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")
            step = make_step(impl.kind, model, b, optimizer)
            step()  # creates the AdamW state: the peak below is a steady-state step's
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            timed = time_ms(step, device, quick)
            row["step_ms"], row["step_iqr_ms"] = timed["median_ms"], timed["iqr_ms"]
    except Exception as exc:  # noqa: BLE001
        _fail(row, exc)
    finally:
        del optimizer


def reference(shape: Shape, weights, b, device: torch.device) -> Optional[Dict[str, torch.Tensor]]:
    """The published model's fp32 outputs and gradients, or None if it cannot run (its row reports why)."""
    try:
        model = build("published", shape, weights, device)
        return outputs_and_grads("published", model, b)
    except Exception:  # noqa: BLE001
        return None
    finally:
        model = None
        _free(device)


def run_gpu(shape: Shape, impls: List[Impl], weights, b, device: torch.device, autocast, quick: bool) -> List[dict]:
    """One row after the other, one model on the device at a time (the peak memory is the row's own).

    The reference is computed first, so that it is part of every row's baseline (``base``), not of a peak.
    """
    ref = reference(shape, weights, b, device)
    rows = []
    for impl in progress(impls, f"bench_model {shape.label}"):
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        prep, _ = prepare(impl, shape, weights, b, ref, device, autocast)
        if prep.model is not None:
            time_gpu_row(prep, b, device, autocast, quick, base)
        rows.append(prep.row)
        prep.model = None
        _free(device)
    return rows


def run_cpu(shape: Shape, impls: List[Impl], weights, b, device: torch.device, quick: bool,
            rounds: int) -> List[dict]:
    """Every model built and checked first, then a warm-up round and ``rounds`` rounds timing one step of each row.

    A CPU step takes seconds: one step per round, interleaved rounds, so that drift hits every row alike;
    the median of the rounds is reported, with the best and the spread.
    """
    preps, ref = [], None
    for impl in progress(impls, f"bench_model {shape.label} check"):
        prep, got = prepare(impl, shape, weights, b, ref, device, None)
        if impl.kind == "published":
            ref = got
        preps.append(prep)
    del ref, got
    steps = {p.impl.key: make_step(p.impl.kind, p.model, b) for p in preps if p.model is not None}
    times: Dict[str, List[float]] = {key: [] for key in steps}
    for _ in progress(range(rounds + 1), f"bench_model {shape.label} rounds", total=rounds + 1):
        for prep in preps:
            if prep.model is None:
                continue
            try:
                with row_context(prep.impl, device, None):
                    started = time.perf_counter()
                    steps[prep.impl.key]()
                    times[prep.impl.key].append(1e3 * (time.perf_counter() - started))
            except Exception as exc:  # noqa: BLE001
                _fail(prep.row, exc)
                prep.model = None
    for prep in preps:
        in_order = times.get(prep.impl.key, [])[1:]  # the first round warms up
        ts = sorted(in_order)
        if ts and prep.model is not None:
            median = ts[len(ts) // 2] if len(ts) % 2 else (ts[len(ts) // 2 - 1] + ts[len(ts) // 2]) / 2
            # The rounds in round order: the rows' i-th rounds ran back to back (ratios paired by round).
            prep.row.update({"fwd_bwd_ms": median, "best_ms": ts[0], "fwd_bwd_rounds_ms": in_order,
                             "rounds": len(ts)})
            if len(ts) > 1:
                prep.row["spread_pct"] = 100 * (ts[-1] - ts[0]) / median
        prep.model = None
    return [p.row for p in preps]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def add_ratios(rows: List[dict], metric: str) -> None:
    """speedup = published / row and vs_hf = row / HF on ``metric`` (ms); mem_vs_hf on the peak memory."""
    by_key = {r["impl"]: r for r in rows}
    pub, hf = by_key.get("published", {}), by_key.get("hf", {})
    for r in rows:
        r["metric"] = metric
        r["speedup"] = _ratio(pub.get(metric), r.get(metric))
        r["vs_hf"] = _ratio(r.get(metric), hf.get(metric))
        r["mem_vs_hf"] = _ratio(r.get("peak_mib"), hf.get("peak_mib"))


@dataclass(frozen=True)
class Target:
    key: str
    row: str  # the row it judges
    text: str
    value: str  # the row's field holding the measured value
    bound: float
    at_least: bool  # True: value >= bound; False: value <= bound

    def met(self, v: float) -> bool:
        return v >= self.bound if self.at_least else v <= self.bound


# The targets. GPU: the best backend's train step; CPU: the torch backend's fwd+bwd.
GPU_TARGETS = [
    Target("published", "camtl", "camtl train step >= 5x faster than the published algorithm", "speedup",
           5.0, True),
    Target("hf_time", "camtl", "camtl train step <= 1.25x the HF BertModel (SDPA) step", "vs_hf", 1.25, False),
    Target("hf_memory", "camtl", "camtl peak memory <= 1.15x the HF BertModel peak", "mem_vs_hf", 1.15, False),
]
# Issue 5's CPU target (1.15x the published algorithm at full padding) is retired (issue 12): at BERT width the
# GEMMs dominate and it measured within the noise. The suite judges the conditioning overhead instead
# (benchmarks/test_model.py).
CPU_TARGETS: List[Target] = []


def add_targets(rows: List[dict], targets: List[Target], noise: Optional[float] = None) -> None:
    """Writes target_<key> (the measured value, None if a row lacks it) and target_<key>_met on the judged row.

    With ``noise`` (a relative error of the timings), a value within it of the bound is not judged:
    target_<key>_met is None and target_<key>_unresolved True.
    """
    by_key = {r["impl"]: r for r in rows}
    for t in targets:
        row = by_key[t.row]
        v = row.get(t.value)
        unresolved = v is not None and noise is not None and abs(v / t.bound - 1) <= noise
        row[f"target_{t.key}"] = v
        row[f"target_{t.key}_met"] = None if v is None or unresolved else t.met(v)
        row[f"target_{t.key}_unresolved"] = unresolved


def twin_noise(rows: List[dict]) -> Optional[float]:
    """CPU: the relative difference of the two camtl rows' medians when both ran the torch backend (the same
    code): an estimate of how far this machine's noise moves a ratio. None otherwise."""
    by_key = {r["impl"]: r for r in rows}
    a, b = (by_key.get(k, {}) for k in CAMTL_KEYS)
    if a.get("backends") != "torch" or not a.get("fwd_bwd_ms") or not b.get("fwd_bwd_ms"):
        return None
    return abs(a["fwd_bwd_ms"] - b["fwd_bwd_ms"]) / min(a["fwd_bwd_ms"], b["fwd_bwd_ms"])


def busy_cpus(seconds: float = 1.0) -> Optional[float]:
    """How many CPUs other processes kept busy while this one slept ``seconds`` (Linux /proc/stat), else None.

    On a shared machine the torch threads wait at every op's barrier for a thread whose core is taken:
    a busy CPU slows the timings far more than its share, and an op-heavy model (the published one)
    more than the others.
    """
    def snapshot():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v), v[3] + v[4]

    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def run(device: torch.device, quick: bool, smoke: bool = False) -> List[dict]:
    gpu_path = smoke or device.type == "cuda"
    if smoke:
        shape = SMOKE_SHAPE
    else:
        shape = GPU_SHAPE if gpu_path else CPU_SHAPES[quick]
    busy_before = None if gpu_path else busy_cpus()
    weights = published_weights(shape)
    b = make_batch(shape, device)
    impls = implementations(device, smoke)
    if gpu_path:
        rows = run_gpu(shape, impls, weights, b, device, torch.bfloat16, quick or smoke)
    else:
        rows = run_cpu(shape, impls, weights, b, device, quick, CPU_ROUNDS[quick])
    _free(device)
    add_ratios(rows, "step_ms" if gpu_path else "fwd_bwd_ms")
    rows[0]["targets"] = "gpu" if gpu_path else "cpu"
    if not gpu_path:
        rows[0].update({"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "busy_cpus_before": busy_before, "busy_cpus_after": busy_cpus()})
    noise = None if gpu_path else twin_noise(rows)
    rows[0]["twin_noise"] = noise
    add_targets(rows, GPU_TARGETS if gpu_path else CPU_TARGETS, noise)
    return rows


COLUMNS = [
    ("implementation", "name", ""),
    ("check", "check", ""),
    ("max err", "max_err", ".2e"),
    ("params M", "params_m", ".1f"),
    ("fwd+bwd ms", "fwd_bwd_ms", ".1f"),
    ("best ms", "best_ms", ".1f"),
    ("spread %", "spread_pct", ".0f"),
    ("step ms", "step_ms", ".1f"),
    ("published/this", "speedup", ".2f"),
    ("this/HF", "vs_hf", ".2f"),
    ("peak MiB", "peak_mib", ".0f"),
    ("peak/HF", "mem_vs_hf", ".2f"),
]


def print_table(rows: List[dict]) -> None:
    head = rows[0]
    gpu_path = head.get("targets") == "gpu"
    gpu_only, cpu_only = ("step_ms", "peak_mib", "mem_vs_hf"), ("best_ms", "spread_pct")
    columns = [c for c in COLUMNS if c[1] not in (cpu_only if gpu_path else gpu_only)]
    what = "train step (fwd+bwd+AdamW)" if gpu_path else "fwd+bwd"
    _print_table(f"CA-MTL-base encoder {what}, {head['dtype']} on {head['device']}, {head['shape']}, "
                 f"{NUM_TASKS} tasks mixed, padding lengths in [L/2, L]", rows, columns)
    for r in rows:
        if "error" in r:
            print(f"  {r['name']}: {r['error']}")
        elif r.get("pass") is False:
            print(f"  FAIL {r['name']}: worst {r['worst']} (max abs err {r['max_err']:.2e})")
    busy = [head.get(k) for k in ("busy_cpus_before", "busy_cpus_after")]
    shared = not gpu_path and None not in busy and max(busy) >= BUSY_CPUS_SHARED and head["threads"] > 1
    by_key = {r["impl"]: r for r in rows}
    for t in GPU_TARGETS if gpu_path else CPU_TARGETS:
        row = by_key[t.row]
        v, met = row.get(f"target_{t.key}"), row.get(f"target_{t.key}_met")
        verdict = "n/a (a row has no measurement)" if v is None else "met" if met else "MISSED"
        if row.get(f"target_{t.key}_unresolved"):
            verdict = f"NOT RESOLVED: within the noise (+-{100 * head['twin_noise']:.0f}%, below) of {t.bound:g}x"
        print(f"  target: {t.text}: {verdict}" + ("" if v is None else f" ({v:.2f}x)")
              + (", UNRELIABLE: the CPU is shared (below)" if shared and v is not None else ""))
    if head.get("twin_noise") is not None:
        print(f"  noise: the two camtl rows run the same code (the torch backend); their medians differ by "
              f"{100 * head['twin_noise']:.1f}%, so a ratio closer to its target than that is not judged")
    if not gpu_path and None not in busy:
        line = (f"{head['threads']} torch threads; CPUs kept busy by other processes (of {head['cpus']}), sampled "
                f"1 s before and after: {busy[0]:.1f}, {busy[1]:.1f}")
        if shared:
            line += (": threads stall at every op's barrier, most in the op-heavy published loops, so the "
                     "timings and ratios are unreliable; run with --threads 1")
        print("  " + line)
    rtol, atol = TOLERANCES[torch.float32]
    rounds = max((r.get("rounds", 0) for r in rows), default=0)
    print(f"check: camtl vs published in fp32 on the timed batch, loss, sequence and pooled outputs and every "
          f"parameter gradient allclose, rtol {rtol:g} atol {atol:g} (atol x max|ref| per tensor); max err: max "
          f"abs difference. published/this and this/HF on {'step' if gpu_path else 'fwd+bwd'} ms (median"
          + ("" if gpu_path else f" of {rounds} interleaved rounds" if rounds > 1 else ", one run") + ")"
          + (". peak: one steady-state train step, above what was allocated before the row's model" if gpu_path
             else ""))


if __name__ == "__main__":
    from common import bench_main

    bench_main(__doc__, run, print_table, threads_option=True)
