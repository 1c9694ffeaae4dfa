"""The camtl CLI end to end on generated toy data: train (a few steps), eval, predict, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from camtl.data import toy


ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def camtl(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "camtl", *args], capture_output=True, text=True, cwd=cwd, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


TRAIN_ARGS = ("--max_steps", "4", "--per_device_train_batch_size", "8", "--max_seq_length", "64",
              "--use_mt_uncertainty", "--save_steps", "2", "--logging_steps", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    toy.write(data, seed=1, n_train=24, n_dev=8, n_test=6)
    out = root / "out"
    stdout = camtl("train", "--data_dir", str(data), "--output_dir", str(out), *TRAIN_ARGS, cwd=root)
    return root, data, out, stdout


def test_train_writes_model_logs_and_metrics(trained):
    root, data, out, stdout = trained
    assert "camtl train: 4 steps" in stdout
    for name in ("model.safetensors", "config.json", "tasks.json", "log.jsonl", "eval_results.json",
                 "checkpoint-2/trainer_state.pt", "checkpoint-4/model.safetensors"):
        assert (out / name).exists(), name
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logs if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(r["loss"] > 0 for r in logs if "loss" in r)
    results = json.loads((out / "eval_results.json").read_text())["results"]
    assert set(results) == {"sentiment", "same-subject", "topic", "overlap"}
    assert 0.0 <= results["topic"]["accuracy"] <= 1.0 and "pearson" in results["overlap"]


def test_train_draws_its_curves_and_plot_redraws_them(trained):
    root, _, out, stdout = trained
    assert f"training curves: {out / 'curves.png'}" in stdout
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert camtl("plot", str(out), "--output", str(root / "again.png"), cwd=root).strip() == str(root / "again.png")
    assert (root / "again.png").stat().st_size > 10_000
    done = subprocess.run([sys.executable, "-m", "camtl", "plot", str(root / "data")], capture_output=True, text=True,
                          cwd=root, env=ENV)
    assert done.returncode == 2 and done.stderr.startswith("camtl: error: no training log at")


def test_eval_reproduces_the_final_evaluation(trained):
    root, data, out, _ = trained
    stdout = camtl("eval", "--model_name_or_path", str(out), "--data_dir", str(data), cwd=root)
    results = json.loads((out / "eval_results.json").read_text())["results"]
    assert f"accuracy {results['sentiment']['accuracy']:.4f}" in stdout


def test_eval_takes_a_checkpoint_folder(trained):
    """Each checkpoint holds the tokenizer and tasks.json too: it evaluates while the run is still going."""
    root, data, out, _ = trained
    for name in ("tasks.json", "tokenizer_config.json"):
        assert (out / "checkpoint-2" / name).exists(), name
    assert "accuracy" in camtl("eval", "--model_name_or_path", str(out / "checkpoint-2"), "--data_dir", str(data),
                               cwd=root)
    stdout = camtl("eval", "--model_name_or_path", str(out / "checkpoint-4"), "--data_dir", str(data), cwd=root)
    results = json.loads((out / "eval_results.json").read_text())["results"]  # step 4's, the last checkpoint
    assert f"accuracy {results['topic']['accuracy']:.4f}" in stdout


def test_predict_writes_submission_files(trained):
    root, data, out, _ = trained
    camtl("predict", "--model_name_or_path", str(out), "--data_dir", str(data), "--output_dir",
          str(root / "pred"), cwd=root)
    lines = (root / "pred" / "topic.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 7
    assert all(line.split("\t")[1] in ("sports", "food", "music") for line in lines[1:])
    scores = [float(line.split("\t")[1]) for line in (root / "pred" / "overlap.tsv").read_text().splitlines()[1:]]
    assert len(scores) == 6


def _same_weights(a_dir, b_dir) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_checkpoint(trained):
    root, data, out, _ = trained
    stdout = camtl("train", "--data_dir", str(data), "--output_dir", str(root / "resumed"), *TRAIN_ARGS,
                   "--resume_from_checkpoint", str(out / "checkpoint-2"), cwd=root)
    assert "camtl train: 4 steps" in stdout
    assert _same_weights(out, root / "resumed")


def test_same_seed_same_run(trained):
    """A fresh run with the same seed is bitwise the same run: the new modules' init is seeded too."""
    root, data, out, _ = trained
    camtl("train", "--data_dir", str(data), "--output_dir", str(root / "again"), *TRAIN_ARGS, cwd=root)
    assert _same_weights(out, root / "again")
    logs = [(out / "log.jsonl").read_text(), (root / "again" / "log.jsonl").read_text()]
    losses = [[json.loads(line).get("loss") for line in text.splitlines()] for text in logs]
    assert losses[0] == losses[1] and any(x is not None for x in losses[0])
    camtl("train", "--data_dir", str(data), "--output_dir", str(root / "other"), *TRAIN_ARGS, "--seed", "7",
          cwd=root)
    assert not _same_weights(out, root / "other")  # the seed does reach the run


def signal_after_step_2(command, out, signum, cwd):
    """Runs ``command`` (which trains into ``out``, logging every step), sends ``signum`` once step 2 is logged;
    returns (its exit code, its stderr) once it has ended."""
    # A test run started in the background (bash without job control) inherits SIGINT ignored, which camtl
    # rightly leaves alone; the child starts with the default action, as under a terminal.
    run = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    log, deadline = out / "log.jsonl", time.time() + 300
    while not (log.exists() and '"step": 2,' in log.read_text()):
        assert run.poll() is None and time.time() < deadline, "the run ended or stalled before step 2"
        time.sleep(0.05)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=300)
    return run.returncode, stderr


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(trained):
    """SIGINT mid-run: the step under way finishes, a checkpoint is saved, exit 130; resuming equals no interrupt."""
    root, data, _, _ = trained
    args = ("--data_dir", str(data), *TRAIN_ARGS, "--max_steps", "12", "--save_steps", "100")
    out = root / "interrupted"
    returncode, stderr = signal_after_step_2([sys.executable, "-m", "camtl", "train", *args, "--output_dir",
                                              str(out)], out, signal.SIGINT, root)
    assert returncode == 130, stderr[-3000:]
    step = int(re.search(r"interrupted after step (\d+) of 12", stderr).group(1))
    checkpoint = out / f"checkpoint-{step}"
    assert 2 <= step < 12 and f"--resume_from_checkpoint {checkpoint}" in stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [checkpoint.name]  # no partial one left
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": step, "interrupted": True, "checkpoint": str(checkpoint)}
    assert [r["step"] for r in records if "loss" in r] == list(range(1, step + 1))

    camtl("train", *args, "--output_dir", str(root / "resumed12"), "--resume_from_checkpoint", str(checkpoint),
          cwd=root)
    camtl("train", *args, "--output_dir", str(root / "straight12"), cwd=root)
    assert _same_weights(root / "resumed12", root / "straight12")


def test_sigterm_to_torchrun_saves_one_checkpoint(trained):
    """A preempted DDP job: torchrun forwards SIGTERM to its 2 processes (gloo); they agree on a step and save."""
    root, data, _, _ = trained
    out = root / "ddp-preempted"
    returncode, stderr = signal_after_step_2(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "camtl", "train",
         "--data_dir", str(data), "--output_dir", str(out), "--max_steps", "40", "--per_device_train_batch_size", "4",
         "--max_seq_length", "64", "--logging_steps", "1", "--save_steps", "100"], out, signal.SIGTERM, root)
    assert returncode != 0  # torchrun reports the signal
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["interrupted"] is True and 2 <= last["step"] < 40, stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{last['step']}"]
    state = torch.load(out / f"checkpoint-{last['step']}" / "trainer_state.pt", weights_only=False)
    assert state["global_step"] == last["step"]


def test_bad_arguments(tmp_path):
    """A mistake is one line and exit code 2, from the installed command too (more cases: test_cli_safety.py)."""
    done = subprocess.run([sys.executable, "-m", "camtl", "train", "--bf16", "--fp16"], capture_output=True,
                          text=True, cwd=tmp_path, env=ENV)
    assert done.returncode == 2 and done.stderr == "camtl: error: choose at most one of --bf16 and --fp16\n"
    assert not (tmp_path / "camtl-output").exists()
