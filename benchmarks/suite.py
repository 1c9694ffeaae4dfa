"""The benchmark suite's machinery: groups of implementations, their timing, ratios, targets and the results table.

A *group* is one case at one shape on one device in one dtype (the conditional attention at B=32 L=128 in bf16,
say), with its implementations (``Entry``: one implementation in one direction, fwd or fwd+bwd). Every entry is
checked against the reference before anything is timed; entries that match are timed in interleaved rounds
(every entry once per round, so that drift hits all alike), on a GPU with CUDA events after a synchronize. One
row per entry, with the row schema of issue 12 (``ROW_FIELDS``); a ``Target`` judges a ratio of the medians
(or, ``paired``, the median of its per-round values), and its per-round values give the spread: a bound inside
it is "not resolved".

A group with a ``work_unit`` ("real tokens": the epoch, judged on issue 11's real tokens/s) gives each entry its
``work`` per call, so that entries whose calls do different amounts of work compare on the same work: its times,
ratios and targets are of ms per 1000 units, 1000 / the median over the rounds of units per second.

``Results`` collects the rows, targets and skipped tests of a run and writes results.json, results.csv,
summary.md and summary.png (benchmarks/plot.py). ``compare_rows`` is benchmarks/compare.py's logic.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

DIRECTIONS = ("fwd", "fwd+bwd")
STATUSES = ("met", "missed", "not resolved", "n/a")
# The row schema of issue 12, in the order of results.csv's columns.
ROW_FIELDS = ["bench", "case", "impl", "device", "dtype", "shape", "direction", "median_ms", "iqr_ms", "rounds",
              "matches_reference", "max_err", "tolerance", "ratio_vs_published", "ratio_vs_peer", "target",
              "target_status"]
# Added after them: the row's label, its peer, the spread of each ratio over the rounds, and what a few benches add.
# time_unit: what median_ms, iqr_ms and rounds_ms measure ("ms per call", or "ms per 1000 real tokens" in a group
# compared on work); work: the units of work of one call; work_per_s: the median over the rounds of units per second.
EXTRA_FIELDS = ["name", "peer", "ratio_vs_published_low", "ratio_vs_published_high", "ratio_vs_peer_low",
                "ratio_vs_peer_high", "best_ms", "time_unit", "work", "work_unit", "work_per_s", "peak_mib",
                "headline"]
MS_PER_CALL = "ms per call"
RATIO_NOTE = ("ratio_vs_published = published ms / this ms and ratio_vs_peer = peer ms / this ms (> 1: this is "
              "faster), medians of the same direction; [low-high]: the ratio's range over the interleaved rounds. "
              "A bench compared on work (the epoch: its rows hold the same examples in different layouts) gives "
              "ms per 1000 real tokens, 1000 / the median real tokens/s, and its ratios are those of real tokens/s")


# ---- groups ------------------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One implementation in one direction: checked (``matches_reference``: None = nothing to check), then timed."""
    impl: str
    name: str
    direction: str
    fn: Optional[Callable[[], object]] = None  # one timed call
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around each round's calls
    matches_reference: Optional[bool] = None
    max_err: Optional[float] = None
    tolerance: str = ""
    error: Optional[str] = None  # it could not run: a skip, or a failure when under_test
    under_test: bool = False  # camtl: an error fails the run; a baseline's error is a skip
    rounds_ms: List[float] = field(default_factory=list)  # ms per call, one value per round, in round order
    work: Optional[float] = None  # units of work (Group.work_unit) one call does: compared per unit, not per call
    extra: Dict[str, object] = field(default_factory=dict)  # extra row fields (peak_mib, ...)


@dataclass
class Target:
    """A bound on ``value(ms by impl)`` (ms per call, or per 1000 units of work; the medians of ``direction``),
    judging the row of ``impl``. ``paired``: the value is the median of the per-round values instead (a value
    that mixes differences of times, such as ``overhead_removed``, is only meaningful within one round)."""
    text: str
    impl: str
    direction: str
    bound: float
    at_least: bool
    value: Callable[[Dict[str, float]], Optional[float]]
    unit: str = "x"
    headline: bool = False
    paired: bool = False


def faster(this: str, other: str) -> Callable[[Dict[str, float]], Optional[float]]:
    """other ms / this ms (per call, or per unit of work): how many times faster ``this`` is."""
    return lambda ms: ms[other] / ms[this] if ms.get(this) and ms.get(other) else None


def slower(this: str, other: str) -> Callable[[Dict[str, float]], Optional[float]]:
    """this ms / other ms: how many times the time of ``other`` ``this`` takes."""
    return lambda ms: ms[this] / ms[other] if ms.get(this) and ms.get(other) else None


def overhead_removed(camtl: str, published: str, plain: str) -> Callable[[Dict[str, float]], Optional[float]]:
    """(published - plain) / (camtl - plain): the share of the published algorithm's extra cost that camtl removes.

    camtl at or below the plain model removes all of it (inf); a published model no slower than the plain one
    has no extra cost to remove (None: not judged)."""
    def value(ms):
        if not all(ms.get(k) for k in (camtl, published, plain)):
            return None
        extra = ms[published] - ms[plain]
        if extra <= 0:
            return None
        left = ms[camtl] - ms[plain]
        return math.inf if left <= 0 else extra / left
    return value


@dataclass
class Group:
    bench: str
    case: str
    shape: str
    device: str
    dtype: str
    entries: List[Entry]
    published: Optional[str] = None  # the impl key of the published algorithm
    peer: Optional[str] = None  # the impl key ratio_vs_peer compares with
    targets: List[Target] = field(default_factory=list)
    headline: bool = False
    skip_reason: Optional[str] = None  # the whole group cannot run here
    work_unit: Optional[str] = None  # set: entries are compared per unit of work (Entry.work), not per call

    def entry(self, impl: str, direction: str) -> Optional[Entry]:
        return next((e for e in self.entries if e.impl == impl and e.direction == direction), None)


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def timeable(entry: Entry) -> bool:
    return entry.fn is not None and entry.error is None and entry.matches_reference is not False


def _calls_per_round(fn: Callable[[], object], context, min_round_s: float, device) -> int:
    """How many calls make a round last about min_round_s: short ops repeat, a model step runs once."""
    with context():
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - started
    return max(1, min(1000, math.ceil(min_round_s / max(once, 1e-7))))


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_interleaved(entries: Sequence[Entry], device, rounds: int, warmup: int = 1,
                     min_round_s: float = 0.02) -> None:
    """Fills entry.rounds_ms (ms per call, one value per round) of each timeable entry, rounds interleaved.

    CPU: perf_counter around each entry's calls. CUDA: a synchronize, then an event pair around each entry's
    calls, read after the last round (no synchronize between the calls being timed). An entry that raises keeps
    its error and leaves the rounds.
    """
    cuda = str(device).startswith("cuda")
    live = [e for e in entries if timeable(e)]
    number: Dict[int, int] = {}
    for e in list(live):
        try:
            for _ in range(warmup):
                with e.context():
                    e.fn()
            number[id(e)] = _calls_per_round(e.fn, e.context, min_round_s, device)
        except Exception as exc:  # noqa: BLE001  (a result to report)
            e.error = error_text(exc)
            live.remove(e)
    events: Dict[int, list] = {id(e): [] for e in live}
    if cuda:
        import torch

        torch.cuda.synchronize(device)
    for _ in range(rounds):
        for e in list(live):
            n = number[id(e)]
            try:
                with e.context():
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        for _ in range(n):
                            e.fn()
                        end.record()
                        events[id(e)].append((start, end, n))
                    else:
                        started = time.perf_counter()
                        for _ in range(n):
                            e.fn()
                        e.rounds_ms.append(1e3 * (time.perf_counter() - started) / n)
            except Exception as exc:  # noqa: BLE001
                e.error = error_text(exc)
                e.rounds_ms = []
                live.remove(e)
    if cuda:
        torch.cuda.synchronize(device)
        for e in live:
            e.rounds_ms = [start.elapsed_time(end) / n for start, end, n in events[id(e)]]


# ---- rows and targets --------------------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def iqr(xs: Sequence[float]) -> Optional[float]:
    if not xs:
        return None
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


def _cost_rounds(entry: Entry, work_unit: Optional[str]) -> List[float]:
    """The entry's rounds in the unit its group compares: ms per call, or ms per 1000 units of work."""
    if work_unit is None or not entry.rounds_ms:
        return list(entry.rounds_ms)
    if not entry.work or entry.work <= 0 or not math.isfinite(entry.work):
        raise ValueError(f"Entry {entry.impl!r} ({entry.direction}): work must be a positive number of "
                         f"{work_unit} per call when its group is compared per unit of work, got {entry.work!r}")
    return [1e3 * ms / entry.work for ms in entry.rounds_ms]


def _cost_median(costs: Sequence[float], work_unit: Optional[str]) -> Optional[float]:
    """The median of ms per call; per unit of work: 1000 / the median rate (issue 11's real tokens/s, the median
    of the rounds' rates: the same for an odd number of rounds, not for an even one)."""
    if not costs:
        return None
    if work_unit is None:
        return median(costs)
    return 1e6 / median([1e6 / c for c in costs])


def _per_round(fn: Callable[[Dict[str, float]], Optional[float]], costs: Dict[str, List[float]]) -> List[float]:
    """fn over each round's times ({impl: rounds}, timed in the same interleaved rounds): the ratio's spread."""
    counts = {len(c) for c in costs.values() if c}
    if len(counts) != 1:
        return []
    values = []
    for i in range(counts.pop()):
        v = fn({impl: c[i] for impl, c in costs.items() if c})
        if v is not None:
            values.append(v)
    return values


def _paired_median(values: Sequence[float], at_least: bool) -> Optional[float]:
    """The median of a target's per-round values; of an even number, the middle one nearer to missing the bound
    (the mean of the two can be inf, and a bound between them is "not resolved" anyway)."""
    if not values:
        return None
    return statistics.median_low(values) if at_least else statistics.median_high(values)


def judge(value: Optional[float], spread: Sequence[float], bound: float, at_least: bool,
          rounds: Optional[int] = None) -> str:
    """met | missed | not resolved | n/a (nothing measured). Not resolved: the bound lies within the per-round
    range, or some of the ``rounds`` gave no value (a ratio undefined in a round: the noise swamps it)."""
    if value is None:
        return "n/a"
    if len(spread) > 1 and min(spread) <= bound <= max(spread):
        return "not resolved"
    if rounds is not None and rounds > 1 and len(spread) < rounds:
        return "not resolved"
    return "met" if (value >= bound if at_least else value <= bound) else "missed"


def evaluate(group: Group) -> Tuple[List[dict], List[dict]]:
    """(a row per entry, a result per target) of a checked and timed group."""
    unit = group.work_unit
    time_unit = MS_PER_CALL if unit is None else f"ms per 1000 {unit}"
    costs = {id(e): _cost_rounds(e, unit) for e in group.entries}

    def by_impl(direction: str) -> Dict[str, List[float]]:
        return {e.impl: costs[id(e)] for e in group.entries if e.direction == direction and e.rounds_ms}

    def medians(direction: str) -> Dict[str, float]:
        return {impl: _cost_median(c, unit) for impl, c in by_impl(direction).items()}

    target_results = []
    for t in group.targets:
        spread = _per_round(t.value, by_impl(t.direction))
        value = _paired_median(spread, t.at_least) if t.paired else t.value(medians(t.direction))
        rounds = max((len(c) for c in by_impl(t.direction).values()), default=0)
        target_results.append({
            "bench": group.bench, "case": group.case, "shape": group.shape, "device": group.device,
            "dtype": group.dtype, "direction": t.direction, "impl": t.impl, "text": t.text, "bound": t.bound,
            "at_least": t.at_least, "unit": t.unit, "value": value, "low": min(spread) if spread else None,
            "high": max(spread) if spread else None, "status": judge(value, spread, t.bound, t.at_least, rounds),
            "headline": t.headline or group.headline})
    rows = []
    for e in group.entries:
        mine_ms = costs[id(e)]
        row = {"bench": group.bench, "case": group.case, "impl": e.impl, "device": group.device,
               "dtype": group.dtype, "shape": group.shape, "direction": e.direction,
               "median_ms": _cost_median(mine_ms, unit), "iqr_ms": iqr(mine_ms), "rounds": len(mine_ms),
               "matches_reference": e.matches_reference, "max_err": e.max_err, "tolerance": e.tolerance,
               "name": e.name, "peer": group.peer, "headline": group.headline,
               "best_ms": min(mine_ms) if mine_ms else None, "rounds_ms": mine_ms, "time_unit": time_unit}
        if unit is not None:
            row.update(work=e.work, work_unit=unit,
                       work_per_s=median([1e6 / c for c in mine_ms]) if mine_ms else None)
        for other, key in ((group.published, "ratio_vs_published"), (group.peer, "ratio_vs_peer")):
            ratio = faster(e.impl, other) if other and other != e.impl else (lambda ms: None)
            row[key] = ratio(medians(e.direction))
            spread = _per_round(ratio, by_impl(e.direction)) if row[key] is not None else []
            row[f"{key}_low"], row[f"{key}_high"] = (min(spread), max(spread)) if spread else (None, None)
        mine = [r for r in target_results if r["impl"] == e.impl and r["direction"] == e.direction]
        row["target"] = "; ".join(r["text"] for r in mine) or None
        row["target_status"] = "; ".join(r["status"] for r in mine) if mine else "n/a"
        if e.error:
            row["error"], row["under_test"] = e.error, e.under_test
        row.update(e.extra)
        rows.append(row)
    return rows, target_results


# ---- the machine's load ------------------------------------------------------------------------------------------

def _cpu_ticks() -> Tuple[int, int, int]:
    """(all CPU ticks, idle ticks, this process's ticks, all threads) from /proc (Linux)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    with open("/proc/self/stat") as f:
        mine = f.read().rsplit(")", 1)[1].split()
    return sum(v), v[3] + v[4], int(mine[11]) + int(mine[12])  # utime + stime


class LoadSampler:
    """Samples, every ``period_s`` in a thread, how many CPUs processes other than this one kept busy."""

    def __init__(self, period_s: float = 2.0):
        self.period_s = period_s
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self):
        cpus = os.cpu_count() or 1
        try:
            last = _cpu_ticks()
        except (OSError, ValueError, IndexError):
            return  # not Linux: no samples, the summary says so
        while not self._stop.wait(self.period_s):
            now = _cpu_ticks()
            total = now[0] - last[0]
            if total > 0:
                busy = (total - (now[1] - last[1])) / total * cpus
                # /proc/stat counts all CPUs' ticks, /proc/self/stat this process's: both in USER_HZ.
                mine = (now[2] - last[2]) / total * cpus
                self.samples.append(max(0.0, busy - mine))
            last = now

    def start(self) -> "LoadSampler":
        self._thread = threading.Thread(target=self._run, name="bench-load-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Dict[str, Optional[float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        s = self.samples
        return {"other_busy_cpus_mean": sum(s) / len(s) if s else None,
                "other_busy_cpus_max": max(s) if s else None, "load_samples": len(s)}


# ---- the results table -------------------------------------------------------------------------------------------

class Results:
    """The rows, targets and skipped tests of one run, and the files they are written to."""

    def __init__(self, meta: Optional[dict] = None):
        self.meta: dict = dict(meta or {})
        self.rows: List[dict] = []
        self.targets: List[dict] = []
        self.skipped: List[dict] = []  # {"test", "reason"}
        self._seen_targets = set()

    def add_row(self, row: dict, target_results: Sequence[dict] = ()) -> None:
        self.rows.append(row)
        for t in target_results:  # a group's targets, once
            key = (t["bench"], t["case"], t["shape"], t["device"], t["direction"], t["text"])
            if key not in self._seen_targets:
                self._seen_targets.add(key)
                self.targets.append(t)

    def add_skip(self, test: str, reason: str) -> None:
        self.skipped.append({"test": test, "reason": reason})

    def as_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "targets": self.targets, "skipped": self.skipped}

    def write_json(self, out: str) -> str:
        """results.json alone: written after every test too, so that a run killed on time keeps its rows."""
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.as_json(), f, indent=1, default=_json_default)
        os.replace(path + ".tmp", path)
        return path

    def write(self, out: str, figure: bool = True) -> List[str]:
        """results.json, results.csv, summary.md and (with matplotlib) summary.png in ``out``; their paths."""
        paths = [self.write_json(out)] + [os.path.join(out, n) for n in ("results.csv", "summary.md")]
        write_csv(self.rows, paths[1])
        with open(paths[2], "w") as f:
            f.write(summary_markdown(self.as_json()))
        if figure:
            try:
                from plot import plot_results

                paths.append(plot_results(self.as_json(), os.path.join(out, "summary.png")))
            except ImportError as exc:
                self.meta.setdefault("notes", []).append(f"no summary.png: {exc} (pip install matplotlib)")
        return paths


def _json_default(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS + EXTRA_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in ROW_FIELDS + EXTRA_FIELDS})


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, spec)
    return str(value)


def ratio_text(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    spread = f" [{low:.2f}-{high:.2f}]" if low is not None and row.get("rounds", 0) > 1 else ""
    return f"{v:.2f}{spread}"


def target_text(t: dict) -> str:
    value = "no value: a time is missing or the ratio is undefined" if t["value"] is None else (
        fmt(t["value"], ".2f") + ("%" if t["unit"] == "%" else "x"))
    spread = f", rounds {t['low']:.2f}-{t['high']:.2f}" if t.get("low") is not None and t["low"] != t["high"] else ""
    return f"{t['status'].upper() if t['status'] == 'missed' else t['status']}: {t['text']} ({value}{spread})"


def skipped_lines(skipped: List[dict]) -> List[str]:
    """One line per (test function, reason): skips of a parametrized test share their reason."""
    counts: Dict[Tuple[str, str], int] = {}
    for s in skipped:
        counts[(s["test"].split("[")[0], s["reason"])] = counts.get((s["test"].split("[")[0], s["reason"]), 0) + 1
    return [f"{test} ({n} case{'s' * (n > 1)}): {reason}" for (test, reason), n in counts.items()]


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def row_label(row: dict) -> str:
    return f"{row['bench']} {row['case']} {row['shape']} {row['dtype']} {row['device']}"


def summary_markdown(results: dict) -> str:
    """The run as markdown: headline, targets, a table per group, what was skipped and why, the noise."""
    meta, rows, targets = results.get("meta", {}), results.get("rows", []), results.get("targets", [])
    lines = [f"# camtl benchmarks {meta.get('date', '')[:16]}", ""]
    env = ", ".join(f"{k} {meta[k]}" for k in ("camtl", "torch", "triton", "device") if meta.get(k))
    if env:
        lines += [env, ""]
    lines += [noise_text(meta), "", RATIO_NOTE + ".", ""]
    failed = [r for r in rows if r.get("matches_reference") is False or (r.get("error") and r.get("under_test"))]
    if failed:
        lines += ["**Equivalence FAILED**: " + ", ".join(f"{row_label(r)} {r['impl']} {r['direction']}"
                                                        for r in failed), ""]
    head_rows = [r for r in rows if r.get("headline")]
    head_targets = [t for t in targets if t.get("headline")]
    if head_rows or head_targets:
        lines += ["## Headline", ""]
        for label in dict.fromkeys(row_label(r) for r in head_rows):
            lines += [f"{label}:", ""] + _group_table([r for r in head_rows if row_label(r) == label]) + [""]
        lines += [f"- {target_text(t)} [{t['bench']}, {t['shape']}, {t['direction']}]" for t in head_targets]
        lines += [""]
    if targets:
        lines += ["## Targets", ""] + [f"- {target_text(t)} [{t['bench']} {t['case']}, {t['shape']}, "
                                       f"{t['dtype']} {t['direction']} on {t['device']}]" for t in targets] + [""]
    lines += ["## Results", ""]
    for label in dict.fromkeys(row_label(r) for r in rows):
        lines += [f"### {label}", ""] + _group_table([r for r in rows if row_label(r) == label]) + [""]
    if not rows:
        lines += ["no rows", ""]
    lines += ["## Skipped", ""]
    lines += [f"- {line}" for line in skipped_lines(results.get("skipped", []))] or ["- nothing"]
    return "\n".join(lines) + "\n"


def time_header(rows: Sequence[dict]) -> str:
    """What the rows' median_ms measures: "ms" (per call) or "ms per 1000 real tokens"; mixed units are named."""
    units = list(dict.fromkeys(r.get("time_unit") or MS_PER_CALL for r in rows))
    return "ms" if units == [MS_PER_CALL] else " / ".join(units)


def _group_table(rows: Sequence[dict]) -> List[str]:
    work_units = list(dict.fromkeys(r["work_unit"] for r in rows if r.get("work_per_s")))
    unit = time_header(rows)
    header = ["implementation", "direction", f"median {unit}", f"IQR {unit}", "rounds", "matches ref", "max err",
              "vs published", "vs peer"] + [f"{u}/s" for u in work_units] + ["target"]
    lines = []
    for r in rows:
        status = "" if not r.get("target") else "; ".join(
            f"{st}: {text}" for st, text in zip(r["target_status"].split("; "), r["target"].split("; ")))
        check = fmt(r.get("matches_reference")) if r.get("matches_reference") is not None else (
            "error" if r.get("error") else "reference" if r.get("tolerance") else "n/a")
        lines.append([r.get("name") or r["impl"], r["direction"], fmt(r.get("median_ms"), ".4g"),
                      fmt(r.get("iqr_ms"), ".2g"), str(r.get("rounds", 0)), check, fmt(r.get("max_err"), ".2e"),
                      ratio_text(r, "ratio_vs_published"), ratio_text(r, "ratio_vs_peer")]
                     + [fmt(r.get("work_per_s"), ",.0f") if r.get("work_unit") == u else "-" for u in work_units]
                     + [status])
    return _table(header, lines)


def noise_text(meta: dict) -> str:
    threads, cpus = meta.get("torch_threads"), meta.get("cpus")
    mean, top = meta.get("other_busy_cpus_mean"), meta.get("other_busy_cpus_max")
    load = ("not sampled" if mean is None else
            f"{mean:.1f} on average, {top:.1f} at most ({meta.get('load_samples')} samples)")
    return (f"Noise: {threads} torch threads on {cpus} CPUs; CPUs kept busy by other processes during the run: "
            f"{load}. CPU rounds are interleaved; a target whose bound lies inside its per-round range is "
            f"\"not resolved\".")


# ---- comparing two runs ------------------------------------------------------------------------------------------

ROW_KEY = ("bench", "case", "impl", "device", "dtype", "shape", "direction")


def relative_spread(row: dict) -> Optional[float]:
    """IQR / median of a row's rounds, None with fewer than 3 rounds (no spread to speak of)."""
    if (row.get("rounds") or 0) < 3 or not row.get("median_ms"):
        return None
    return (row.get("iqr_ms") or 0.0) / row["median_ms"]


def compare_rows(a_rows: Sequence[dict], b_rows: Sequence[dict]) -> List[dict]:
    """Per row present in both runs: B / A of the medians, the noise (the sum of both relative IQRs) and whether
    the time moved by more than it ("faster", "slower"; "?" when a run has too few rounds to say)."""
    a_by = {tuple(r.get(k) for k in ROW_KEY): r for r in a_rows}
    out = []
    for b in b_rows:
        key = tuple(b.get(k) for k in ROW_KEY)
        a = a_by.get(key)
        if a is None or not a.get("median_ms") or not b.get("median_ms"):
            continue
        if (a.get("time_unit") or MS_PER_CALL) != (b.get("time_unit") or MS_PER_CALL):
            continue  # ms per call against ms per 1000 tokens: not the same measure
        ratio = b["median_ms"] / a["median_ms"]
        sa, sb = relative_spread(a), relative_spread(b)
        noise = None if sa is None or sb is None else sa + sb
        if noise is None:
            moved = "?"
        elif abs(ratio - 1) <= noise:
            moved = ""
        else:
            moved = "slower" if ratio > 1 else "faster"
        out.append({**dict(zip(ROW_KEY, key)), "name": b.get("name") or b["impl"], "a_ms": a["median_ms"],
                    "b_ms": b["median_ms"], "ratio": ratio, "noise": noise, "moved": moved})
    return out


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
