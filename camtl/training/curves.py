"""Training curves of a run, drawn from its ``log.jsonl``: losses, evaluation metrics, gradient norm, learning rate.

The log holds one JSON object per line: training records ``{"step", "loss", "loss/<task>", "grad_norm", "lr",
...}``, evaluation records ``{"step", "eval": {task: {metric: value}}}`` and, after Ctrl-C, ``{"step",
"interrupted": true, "checkpoint"}``. A run resumed into the same folder appends to it: for a step logged
twice, the later record wins (it is the run that went on). Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

LOG_NAME = "log.jsonl"
FIGURE_NAME = "curves.png"


@dataclass
class TrainingLog:
    """The series of a log: each maps a name to {step: value}, in step order."""

    train: Dict[str, Dict[int, float]] = field(default_factory=dict)  # "loss", "loss/<task>", "grad_norm", "lr"
    eval: Dict[str, Dict[int, float]] = field(default_factory=dict)  # "<task> <metric>"
    interrupted_at: List[int] = field(default_factory=list)


def log_path_of(run: str) -> str:
    """A run folder (holding log.jsonl) or the log file itself."""
    path = os.path.join(run, LOG_NAME) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training log at {path}: give a `camtl train` output folder or its {LOG_NAME}")
    return path


def read_log(path: str) -> TrainingLog:
    """Parses a log.jsonl; a line that is not a JSON object with an integer step raises ValueError naming it."""
    log = TrainingLog()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{number}: expected an object with an integer 'step', got {line.strip()[:80]}")
            step, where = record["step"], f"{path}:{number}"
            if record.get("interrupted"):
                log.interrupted_at.append(step)
            elif "eval" in record:
                if not isinstance(record["eval"], dict):
                    raise ValueError(f"{where}: 'eval' must map each task to its metrics")
                for task, metrics in record["eval"].items():
                    if not isinstance(metrics, dict):
                        raise ValueError(f"{where}: the metrics of task {task!r} must be an object")
                    for metric, value in metrics.items():
                        log.eval.setdefault(f"{task} {metric}", {})[step] = _number(value, where, metric)
            else:
                for name, value in record.items():
                    if name == "loss" or name.startswith("loss/") or name in ("grad_norm", "lr"):
                        log.train.setdefault(name, {})[step] = _number(value, where, name)
    return log


def _number(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name!r} must be a number, got {value!r}")
    return float(value)


def training_figure(log: TrainingLog, title: str = ""):
    """A matplotlib Figure of 4 panels: losses, evaluation metrics, gradient norm, learning rate."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting the training curves needs matplotlib: pip install matplotlib") from None

    fig = Figure(figsize=(13, 8), layout="constrained")
    (ax_loss, ax_eval), (ax_grad, ax_lr) = fig.subplots(2, 2, sharex=True)

    def draw(ax, series: Dict[int, float], **style):
        steps = sorted(series)
        ax.plot(steps, [series[s] for s in steps], **style)

    for name in sorted(log.train):
        if name == "loss":
            draw(ax_loss, log.train[name], label="loss (mean over tasks)", color="black", linewidth=2)
        elif name.startswith("loss/"):
            draw(ax_loss, log.train[name], label=name[len("loss/"):], linewidth=1, alpha=0.8)
    if any(log.train.get(name) for name in log.train if name.startswith("loss")):
        ax_loss.set_yscale("log")  # cross-entropy and MSE losses differ by orders of magnitude
    for name in sorted(log.eval):
        draw(ax_eval, log.eval[name], label=name, marker="o", markersize=3)
    if "grad_norm" in log.train:
        draw(ax_grad, log.train["grad_norm"], color="tab:red")
    if "lr" in log.train:
        draw(ax_lr, log.train["lr"], color="tab:green")
    panels = ((ax_loss, "training loss"), (ax_eval, "evaluation (dev), as measured"),
              (ax_grad, "gradient norm (before clipping)"), (ax_lr, "learning rate"))
    for ax, name in panels:
        ax.set_title(name)
        ax.grid(alpha=0.3)
        for step in log.interrupted_at:
            ax.axvline(step, color="gray", linestyle="--", linewidth=1, label="_interrupted")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        if not any(line.get_label() != "_interrupted" for line in ax.lines):
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in (ax_grad, ax_lr):
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    return fig


def plot_training_log(run: str, out: Optional[str] = None) -> str:
    """Draws a run's curves into ``out`` (default: curves.png beside the log); returns the file written."""
    path = log_path_of(run)
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), FIGURE_NAME)
    log = read_log(path)
    if not log.train and not log.eval:
        raise ValueError(f"{path}: no training or evaluation record to plot")
    training_figure(log, title=os.path.basename(os.path.dirname(os.path.abspath(path)))).savefig(out, dpi=110)
    return out
