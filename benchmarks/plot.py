"""summary.png of a benchmark run, from its results.json: the headline benches first, then a panel per bench.

    python benchmarks/plot.py [DIR]      # DIR holds results.json (default .benchmarks/latest)

Each row is a bar (its median; the whisker spans its rounds, best to worst), labeled with its direction (fwd, or
fwd+bwd hatched); bars are grouped by case and shape. A bar is ms per call, or ms per 1000 real tokens in a bench
compared on work (the epoch), as its axis says. A panel lists its targets with their status (met green,
missed red, not resolved gray) and marks the judged bar's value; a row that failed its equivalence check is red
and says FAIL. The last panel lists the skipped tests and their reasons. Needs matplotlib.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from typing import Dict, List, Optional

from suite import MS_PER_CALL, skipped_lines, time_header

FIGURE_NAME = "summary.png"
STATUS_COLORS = {"met": "tab:green", "missed": "tab:red", "not resolved": "tab:gray", "n/a": "black"}


def _color(row: dict) -> str:
    """camtl blue, the published algorithm gray, the peers and bounds orange; a failed check red."""
    if row.get("matches_reference") is False or (row.get("error") and row.get("under_test")):
        return "tab:red"
    if row["impl"] == "published":
        return "tab:gray"
    return "tab:blue" if row["impl"].startswith("camtl") or row["impl"] == "torch" else "tab:orange"


def _ms(ms: float) -> str:
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def bench_order(rows: List[dict], targets: List[dict] = ()) -> List[str]:
    """Benches in row order, those with headline rows or targets first."""
    benches = list(dict.fromkeys(r["bench"] for r in rows))
    return sorted(benches, key=lambda b: not any(x.get("headline") for x in list(rows) + list(targets)
                                                 if x["bench"] == b))


def summary_figure(results: dict):
    """The figure of a results.json dict ({"meta", "rows", "targets", "skipped"}): per bench a panel of bars and
    the lines of its targets, then the skipped tests."""
    from matplotlib.figure import Figure

    rows = [r for r in results.get("rows", []) if r.get("median_ms") or r.get("matches_reference") is False]
    targets, meta = results.get("targets", []), results.get("meta", {})
    skipped = skipped_lines(results.get("skipped", []))
    blocks = []  # (height in inches, draw(subfigure))
    for bench in bench_order(rows, targets):
        bench_rows = [r for r in rows if r["bench"] == bench]
        bench_targets = [t for t in targets if t["bench"] == bench]
        height = 1.2 + 0.26 * len(bench_rows) + 0.3 * len({_group(r) for r in bench_rows})
        blocks.append((height, lambda sf, b=bench, rs=bench_rows, ts=bench_targets: _panel(sf.subplots(), b, rs, ts)))
        if bench_targets:
            blocks.append((0.15 + 0.2 * len(bench_targets), lambda sf, ts=bench_targets: _target_lines(sf, ts)))
    blocks.append((0.45 + 0.2 * max(1, len(skipped)), lambda sf: _skipped_lines(sf, skipped)))
    heights = [h for h, _ in blocks]
    fig = Figure(figsize=(12, max(4.0, sum(heights) + 0.4)), layout="constrained")
    subfigs = fig.subfigures(len(blocks), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sf, (_, draw) in zip(subfigs, blocks):
        draw(sf)
    fig.suptitle(f"camtl {meta.get('camtl', '?')}, torch {meta.get('torch', '?')} on {meta.get('device', '?')}, "
                 f"{meta.get('torch_threads', '?')} threads, {meta.get('date', '')[:16]}"
                 + (" (quick)" if meta.get("quick") else ""), fontsize="medium")
    return fig


def _group(row: dict) -> str:
    return f"{row['case']}, {row['shape']}, {row['dtype']} on {row['device']}"


def _panel(ax, bench: str, rows: List[dict], targets: List[dict]) -> None:
    """Bars grouped by case and shape; a bar a target judges gets an edge in its status color."""
    from matplotlib.transforms import blended_transform_factory

    heading_at = blended_transform_factory(ax.transAxes, ax.transData)
    y, ticks, labels = 0.0, [], []
    judged: Dict[tuple, List[dict]] = {}
    for t in targets:
        judged.setdefault((t["case"], t["shape"], t["impl"], t["direction"]), []).append(t)
    for group in dict.fromkeys(_group(r) for r in rows):
        ax.text(0.005, y, textwrap.shorten(group, 115), transform=heading_at, va="center", fontsize="small",
                fontweight="bold")
        y += 0.9
        for r in (r for r in rows if _group(r) == group):
            ms = r.get("median_ms") or 0.0
            rounds = r.get("rounds_ms") or []
            whisker = [[ms - min(rounds)], [max(rounds) - ms]] if len(rounds) > 1 else None
            mine = judged.get((r["case"], r["shape"], r["impl"], r["direction"]), [])
            worst = next((s for s in ("missed", "not resolved", "met", "n/a") if any(t["status"] == s for t in mine)),
                         None)
            ax.barh(y, ms, height=0.8, xerr=whisker, color=_color(r), alpha=0.85, capsize=3,
                    hatch="//" if r["direction"] == "fwd+bwd" else None,
                    edgecolor=STATUS_COLORS.get(worst, "white"), linewidth=2.5 if worst else 0.5)
            note = " FAIL (equivalence)" if r.get("matches_reference") is False else ""
            if r.get("work_per_s"):
                note += f", {r['work_per_s']:,.0f} {r['work_unit']}/s"
            if mine:
                note += "  [target: " + ", ".join(t["status"] for t in mine) + "]"
            ax.text(max([ms] + rounds), y, f" {_ms(ms)}{note}" if ms else note, va="center", fontsize="small",
                    color=STATUS_COLORS.get(worst, "black") if worst in ("missed", "met") else "black")
            ticks.append(y)
            labels.append(f"{textwrap.shorten(r.get('name') or r['impl'], 44)}  [{r['direction']}]")
            y += 1.0
        y += 0.2
    ax.set_yticks(ticks, labels, fontsize="small")
    ax.set_ylim(y - 0.3, -0.6)
    times = [r["median_ms"] for r in rows if r.get("median_ms")]
    unit = time_header(rows)
    axis = (f"median {MS_PER_CALL if unit == 'ms' else unit}; whisker: the rounds' range; hatched: fwd+bwd; "
            f"edge: a target's status")
    if times and max(times) / min(times) > 20:  # a log axis only where the times span decades
        ax.set_xscale("log")
        axis += " (log scale)"
    if times:
        ax.set_xlim(right=max(max(r.get("rounds_ms") or [r.get("median_ms") or 0]) for r in rows) * 1.9)
    ax.set_xlabel(axis, fontsize="small")
    headline = " (headline)" if any(r.get("headline") for r in rows) else ""
    ax.set_title(f"{bench}{headline}", loc="left", fontsize="medium", fontweight="bold")
    ax.grid(axis="x", alpha=0.3)


def target_line(t: dict) -> str:
    unit = "%" if t["unit"] == "%" else "x"
    value = "no value" if t["value"] is None else ("inf" if math.isinf(t["value"]) else f"{t['value']:.2f}") + unit
    spread = "" if t.get("low") is None or t["low"] == t["high"] else f", rounds {t['low']:.2f}-{t['high']:.2f}{unit}"
    return f"{t['status']:>12}:  {t['text']}  ({value}{spread}; {t['case']}, {t['direction']}, {t['device']})"


def _target_lines(sf, targets: List[dict]) -> None:
    for i, t in enumerate(targets):
        sf.text(0.01, 1 - (i + 0.5) / len(targets), textwrap.shorten(target_line(t), 160), va="center",
                fontsize="small", family="monospace", color=STATUS_COLORS[t["status"]])


def _skipped_lines(sf, lines: List[str]) -> None:
    text = "\n".join(textwrap.shorten(line, 165) for line in lines) or "nothing was skipped"
    sf.text(0.01, 0.98, "skipped", va="top", fontsize="medium", fontweight="bold")
    sf.text(0.01, 0.98 - 0.3 / (0.45 + 0.2 * max(1, len(lines))), text, va="top", fontsize="small",
            family="monospace")


def plot_results(results, out: Optional[str] = None) -> str:
    """Draws ``results`` (a results.json dict, or the folder holding results.json) into ``out`` (default
    DIR/summary.png); returns its path."""
    if not isinstance(results, dict):
        directory = results
        path = os.path.join(directory, "results.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no results.json in {directory}: run `make bench` (pytest benchmarks/)")
        with open(path) as f:
            results = json.load(f)
        out = out or os.path.join(directory, FIGURE_NAME)
    if out is None:
        raise ValueError("plot_results: out (the PNG's path) is needed when results is a dict")
    summary_figure(results).savefig(out, dpi=100)
    return out


if __name__ == "__main__":
    print(plot_results(sys.argv[1] if len(sys.argv) > 1 else ".benchmarks/latest"))
