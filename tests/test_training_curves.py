"""camtl.training.curves: a run's log.jsonl read into series and drawn (matplotlib)."""

import json

import pytest

from camtl.training.curves import log_path_of, plot_training_log, read_log, training_figure

RECORDS = [
    {"step": 1, "epoch": 0.1, "elapsed_s": 0.5, "loss": 2.0, "loss/cola": 1.5, "loss/sts-b": 2.5, "grad_norm": 9.0,
     "lr": 1e-4},
    {"step": 2, "epoch": 0.2, "elapsed_s": 1.0, "loss": 1.8, "loss/cola": 1.4, "grad_norm": 8.0, "lr": 9e-5},
    {"step": 2, "eval": {"cola": {"mcc": 0.1}, "sts-b": {"pearson": 0.3, "spearmanr": 0.25}}},
    {"step": 3, "epoch": 0.3, "elapsed_s": 1.5, "loss": 1.7, "loss/sts-b": 2.0, "grad_norm": 7.5, "lr": 8e-5},
    {"step": 3, "interrupted": True, "checkpoint": "run/checkpoint-3"},
    # resumed from checkpoint-2 into the same folder: step 3 again, the later record wins
    {"step": 3, "epoch": 0.3, "elapsed_s": 0.4, "loss": 1.6, "loss/sts-b": 1.9, "grad_norm": 7.0, "lr": 8e-5},
    {"step": 4, "eval": {"cola": {"mcc": 0.2}, "sts-b": {"pearson": 0.5, "spearmanr": 0.45}}},
]


def write(tmp_path, records, extra=""):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra)
    return tmp_path


def test_read_log_series(tmp_path):
    log = read_log(log_path_of(str(write(tmp_path, RECORDS))))
    assert log.train["loss"] == {1: 2.0, 2: 1.8, 3: 1.6}
    assert log.train["loss/cola"] == {1: 1.5, 2: 1.4} and log.train["loss/sts-b"] == {1: 2.5, 3: 1.9}
    assert log.train["grad_norm"][3] == 7.0 and log.train["lr"][1] == 1e-4
    assert "epoch" not in log.train and "elapsed_s" not in log.train
    assert log.eval == {"cola mcc": {2: 0.1, 4: 0.2}, "sts-b pearson": {2: 0.3, 4: 0.5},
                        "sts-b spearmanr": {2: 0.25, 4: 0.45}}
    assert log.interrupted_at == [3]


def test_figure_draws_every_series(tmp_path):
    fig = training_figure(read_log(str(write(tmp_path, RECORDS) / "log.jsonl")), title="run")
    loss, evals, grad, lr = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss.lines}
    assert lines["loss (mean over tasks)"] == ([1, 2, 3], [2.0, 1.8, 1.6])
    assert lines["sts-b"] == ([1, 3], [2.5, 1.9])
    assert {line.get_label() for line in evals.lines if not line.get_label().startswith("_")} == {
        "cola mcc", "sts-b pearson", "sts-b spearmanr"}
    assert list(grad.lines[0].get_ydata()) == [9.0, 8.0, 7.0] and list(lr.lines[0].get_xdata()) == [1, 2, 3]
    # the interruption is marked on every panel (a vertical line at step 3)
    assert all(any(list(line.get_xdata()) == [3, 3] for line in ax.lines) for ax in fig.axes)


def test_empty_panels_say_so(tmp_path):
    records = RECORDS[:2] + [{"step": 2, "interrupted": True, "checkpoint": "run/checkpoint-2"}]
    _, evals, _, _ = training_figure(read_log(str(write(tmp_path, records) / "log.jsonl"))).axes
    assert [t.get_text() for t in evals.texts] == ["nothing logged"]


def test_plot_writes_a_png(tmp_path):
    out = plot_training_log(str(write(tmp_path, RECORDS)))
    assert out == str(tmp_path / "curves.png")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_logs_name_the_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log at .*log.jsonl"):
        log_path_of(str(tmp_path))
    write(tmp_path, RECORDS[:2], extra="{not json\n")
    with pytest.raises(ValueError, match=r"log.jsonl:3: not JSON"):
        read_log(str(tmp_path / "log.jsonl"))
    write(tmp_path, RECORDS[:1], extra='{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: expected an object with an integer 'step'"):
        read_log(str(tmp_path / "log.jsonl"))
    for bad, message in (({"step": 4, "eval": {"cola": {"mcc": None}}}, r"log.jsonl:2: 'mcc' must be a number"),
                         ({"step": 4, "eval": {"cola": 0.5}}, r"log.jsonl:2: the metrics of task 'cola'"),
                         ({"step": 4, "eval": [1]}, r"log.jsonl:2: 'eval' must map each task"),
                         ({"step": 4, "loss": "1.0"}, r"log.jsonl:2: 'loss' must be a number")):
        write(tmp_path, RECORDS[:1] + [bad])
        with pytest.raises(ValueError, match=message):
            read_log(str(tmp_path / "log.jsonl"))
    write(tmp_path, [{"step": 1, "interrupted": True, "checkpoint": "x"}])
    with pytest.raises(ValueError, match="no training or evaluation record to plot"):
        plot_training_log(str(tmp_path))
