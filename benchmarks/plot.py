"""One figure of a ``make bench`` run: a panel per bench, each implementation's time as a bar, grouped.

    python benchmarks/plot.py [DIR]      # DIR holds the <bench>.json files (default .benchmarks/latest)

Bars are the fwd+bwd time (the train step on a GPU, the forward where a row has no backward); a bench timed
in rounds (bench_model on the CPU) shows the spread of its rounds as a whisker from the best to the worst.
A failed equivalence check is marked FAIL beside its bar. Needs matplotlib.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Dict, List, NamedTuple, Optional

FIGURE_NAME = "summary.png"


class Bar(NamedTuple):
    group: str
    label: str
    ms: float
    low: Optional[float] = None  # the best round, for a whisker
    high: Optional[float] = None  # the worst round
    failed: bool = False


def bars_of(bench: str, rows: List[dict]) -> List[Bar]:
    """The bars of one bench's rows; rows that did not run (a note, an error, no time) give none."""
    bars = []
    for row in rows:
        failed = row.get("pass") is False
        if bench == "bench_modules":
            for side in ("published", "camtl"):
                ms = row.get(f"{side}_fwd_bwd_ms")
                if ms:
                    bars.append(Bar(row["module"], side, ms, failed=failed and side == "camtl"))
            continue
        ms = row.get("step_ms") or row.get("fwd_bwd_ms") or row.get("fwd_ms")
        if not ms or "note" in row:
            continue
        rounds = row.get("fwd_bwd_rounds_ms") or []
        group = " ".join(str(row[k]) for k in ("op", "shape", "dtype") if row.get(k))
        bars.append(Bar(group, row.get("name") or row.get("impl", "?"), ms, min(rounds, default=None),
                        max(rounds, default=None), failed))
    return bars


def _color(bar: Bar) -> str:
    """camtl blue, the published algorithm gray, other peers and bounds orange; a failed check red."""
    if bar.failed:
        return "tab:red"
    if bar.label.startswith("published"):
        return "tab:gray"
    return "tab:blue" if "camtl" in bar.label else "tab:orange"


def _ms(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def summary_figure(results: Dict[str, dict]):
    """results: bench name -> its JSON ({"rows": [...], "environment": {...}, "date": ...})."""
    from matplotlib.figure import Figure

    panels = [(name, bars_of(name, data["rows"])) for name, data in results.items()]
    panels = [(name, bars) for name, bars in panels if bars]
    heights = [0.9 + 0.28 * len(bars) + 0.25 * len({b.group for b in bars}) for _, bars in panels]
    fig = Figure(figsize=(11, max(3.0, sum(heights))), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0] if panels else []
    for ax, (name, bars) in zip(axes, panels):
        y, ticks, labels, groups = 0.0, [], [], []
        names = list(dict.fromkeys(b.group for b in bars))
        for group in names:
            if len(names) > 1:  # a heading per group; a single group goes into the title
                groups.append((y, textwrap.shorten(group, 48)))
                y += 0.6
            for bar in (b for b in bars if b.group == group):
                whisker = None
                if bar.low is not None and bar.high is not None:
                    whisker = [[bar.ms - bar.low], [bar.high - bar.ms]]
                ax.barh(y, bar.ms, height=0.8, xerr=whisker, color=_color(bar), alpha=0.85, capsize=3)
                ax.text(max(bar.ms, bar.high or 0.0), y, f" {_ms(bar.ms)}" + (" FAIL" if bar.failed else ""),
                        va="center", fontsize="small")
                ticks.append(y)
                labels.append(bar.label)
                y += 1.0
            y += 0.4
        ax.set_yticks(ticks + [top for top, _ in groups], labels + [group for _, group in groups], fontsize="small")
        for tick in ax.get_yticklabels()[len(ticks):]:
            tick.set_fontweight("bold")
        ax.invert_yaxis()
        times = [b.ms for b in bars]
        if max(times) / min(times) > 20:  # a log axis only where the times span decades
            ax.set_xscale("log")
            ax.set_xlabel("ms (log scale)")
        else:
            ax.set_xlabel("ms")
        ax.set_title(name if len(names) > 1 else f"{name}: {names[0]}", loc="left", fontsize="medium")
        ax.grid(axis="x", alpha=0.3)
    if results:
        any_data = next(iter(results.values()))
        env = any_data.get("environment", {})
        fig.suptitle(f"camtl {env.get('camtl', '?')}, torch {env.get('torch', '?')} on {env.get('device', '?')}, "
                     f"{any_data.get('date', '')[:16]}", fontsize="medium")
    return fig


def plot_results(directory: str, out: Optional[str] = None, benches: Optional[List[str]] = None) -> str:
    """Reads DIR/<bench>.json (those of ``benches``, default every one there) and writes the summary figure
    (default DIR/summary.png); returns its path. A JSON file that is not a bench's result is skipped."""
    names = benches if benches is not None else sorted(n[:-len(".json")] for n in os.listdir(directory)
                                                        if n.endswith(".json"))
    results = {}
    for name in names:
        try:
            with open(os.path.join(directory, f"{name}.json")) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            results[name] = data
    if not results:
        raise FileNotFoundError(f"no <bench>.json in {directory}: run `make bench` (or benchmarks/run.py --out DIR)")
    out = out or os.path.join(directory, FIGURE_NAME)
    summary_figure(results).savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot_results(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/latest"))
