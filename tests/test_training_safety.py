"""Trainer hardening: safe checkpoint loading, non-finite guards, argument checks, resume edge cases,
saves that cannot lose work, one run per output folder, checkpoint rotation."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from camtl.training import (CheckpointError, MultiTaskBatchSampler, NonFiniteLossError, OutputDirInUseError,
                            Trainer, TrainingArguments, freeze_encoder_layers)
from test_training import ToyDataset, collate, tiny_model

TASK_NAMES = ["rte", "sts-b", "mnli"]  # task 1 is the regression task


def make_trainer(out, dataset=None, eval_datasets=None, compute_metrics=None, model=None, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, progress=False, learning_rate=1e-3)
    kwargs.update(overrides)
    return Trainer(model or tiny_model(), TrainingArguments(**kwargs), dataset or ToyDataset(), collate,
                   eval_datasets, compute_metrics, TASK_NAMES)


def checkpoints(folder):
    return sorted((p.name for p in folder.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)),
                  key=lambda name: int(name.split("-")[1]))


def all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---- 1. a checkpoint cannot run code ----------------------------------------------------------------------

class WritesAFile:
    """Unpickling it writes ``path``: the payload of a tampered checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def test_resume_refuses_a_checkpoint_whose_unpickling_runs_code(tmp_path):
    make_trainer(tmp_path / "run", max_steps=2, save_steps=1).train()
    state_file = tmp_path / "run" / "checkpoint-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)  # what camtl writes loads safely
    state["rng"]["payload"] = WritesAFile(tmp_path / "pwned")
    torch.save(state, state_file)
    # The payload is live: an unsafe load runs it (here on a copy, writing another file).
    torch.save({"payload": WritesAFile(tmp_path / "control")}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").exists()

    model = tiny_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path / "resumed", model=model, max_steps=4)
    with pytest.raises(CheckpointError, match=f"refusing to load {re.escape(str(state_file))}: .*run code"):
        trainer.train(resume_from=str(state_file.parent))
    assert not (tmp_path / "pwned").exists()
    assert trainer.global_step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_state_holds_only_plain_data(tmp_path):
    """RNG states (python, numpy) are stored as lists and tensors, so weights_only=True loads them."""
    make_trainer(tmp_path, max_steps=1).train()
    state = torch.load(tmp_path / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert isinstance(state["rng"]["python"][1], list) and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert state["global_step"] == 1


# ---- 2. non-finite losses and gradients -------------------------------------------------------------------

def nan_regression_labels():
    """Toy data with every label of task 1 (regression, "sts-b") NaN; the steps whose batch holds one.

    Task 1 is small (3 examples), so that the first steps train and only some steps are hit."""
    dataset = ToyDataset(sizes=(12, 3, 9))
    for i in dataset.task_indices[1]:
        dataset.items[i] = dict(dataset.items[i], label=math.nan)
    sampler = MultiTaskBatchSampler(dataset.task_indices, 4, seed=42)
    hit = [step for step in range(1, 9) if set(sampler.next_batch()) & set(dataset.task_indices[1])]
    return dataset, hit


def test_a_nan_loss_stops_training_naming_the_step_and_the_task(tmp_path):
    dataset, hit = nan_regression_labels()
    first = hit[0]
    assert first > 1
    trainer = make_trainer(tmp_path, dataset=dataset, max_steps=8, save_steps=1, logging_steps=1)
    with pytest.raises(NonFiniteLossError, match=rf"^step {first}: the loss of task sts-b \(nan\) is not finite") \
            as failure:
        trainer.train()
    assert failure.value.step == first and failure.value.tasks == ["sts-b"]
    assert trainer.global_step == first - 1 and all_finite(trainer.model)
    assert f"checkpoint-{first}" not in checkpoints(tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logged if "loss" in r)


def test_a_nonfinite_gradient_stops_training(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    weight = trainer.model.bert.encoder.layer[0].attention.self.query.weight
    weight.register_hook(lambda grad: grad * math.inf)  # finite loss, infinite gradient
    with pytest.raises(NonFiniteLossError, match=r"^step 1: the gradient norm \((inf|nan)\) is not finite"):
        trainer.train()
    assert all_finite(trainer.model) and not (tmp_path / "checkpoint-1").exists()


def test_skip_nonfinite_steps_skips_and_counts_them(tmp_path):
    dataset, hit = nan_regression_labels()
    steps = 8
    assert 0 < len(hit) < steps  # some steps are skipped, others train
    model = tiny_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, dataset=dataset, model=model, max_steps=steps, logging_steps=1,
                           skip_nonfinite_steps=True)
    with pytest.warns(UserWarning) as warned:
        trainer.train()
    skip_warnings = [re.fullmatch(r"camtl: step (\d+): the loss of task sts-b \(nan\) is not finite; step skipped "
                                  r"\(no update\)", str(w.message)) for w in warned]
    assert [int(m.group(1)) for m in skip_warnings if m] == hit
    assert trainer.global_step == steps and trainer.skipped_nonfinite_steps == len(hit)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    counts = [r["skipped_nonfinite_steps"] for r in logged if "loss" in r]
    assert counts == [sum(h <= step for h in hit) for step in range(1, steps + 1)]
    assert all_finite(model)
    assert sum(not torch.equal(v, initial[k]) for k, v in model.state_dict().items()) > 50
    state = torch.load(tmp_path / f"checkpoint-{steps}" / "trainer_state.pt", weights_only=True)
    assert state["skipped_nonfinite_steps"] == len(hit)


def test_nonfinite_weights_are_never_saved(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    before = (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes()
    with torch.no_grad():
        trainer.model.decoders[0].model.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match=r"decoders\.0\.model\.weight are not finite"):
        trainer.save_checkpoint(str(tmp_path / "checkpoint-1"))
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == before


# ---- 3. argument checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, allowed", [
    ("learning_rate", math.inf, "a finite number > 0"),
    ("learning_rate", 0.0, "a finite number > 0"),
    ("learning_rate", math.nan, "a finite number > 0"),
    ("max_steps", -1, "an integer >= 0"),
    ("num_train_epochs", math.inf, r"a finite number > 0 \(when max_steps is 0\)"),
    ("num_train_epochs", 0.0, r"a finite number > 0 \(when max_steps is 0\)"),
    ("per_device_train_batch_size", 0, "an integer >= 1"),
    ("per_device_eval_batch_size", 0, "an integer >= 1"),
    ("gradient_accumulation_steps", 0, "an integer >= 1"),
    ("logging_steps", 0, "an integer >= 1"),
    ("eval_steps", -1, "an integer >= 0"),
    ("save_steps", -2, "an integer >= 0"),
    ("warmup_proportion", 1.5, r"in \[0, 1\]"),
    ("warmup_proportion", -0.1, r"in \[0, 1\]"),
    ("weight_decay", -0.01, "a finite number >= 0"),
    ("max_grad_norm", -1.0, r"a finite number >= 0 \(0: no clipping\)"),
    ("max_grad_norm", math.inf, r"a finite number >= 0 \(0: no clipping\)"),
    ("sampling", "random", "one of proportional, uniform, mt_uncertainty"),
    ("save_total_limit", 0, "an integer >= 1"),
])
def test_bad_arguments_name_themselves_and_their_range(name, value, allowed):
    expected = rf"^TrainingArguments: {name} must be {allowed}, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=expected):
        TrainingArguments(**{name: value})


def test_argument_combinations_and_layer_ranges():
    TrainingArguments(num_train_epochs=0.0, max_steps=3)  # epochs do not count when max_steps is set
    with pytest.raises(ValueError, match="at most one of bf16 and fp16"):
        TrainingArguments(bf16=True, fp16=True)
    for spec in ("3", "3-1", "a-b", "-1-2"):
        with pytest.raises(ValueError, match=rf"freeze_encoder_layers must be 'a-b' .*0 <= a <= b, got {spec!r}"):
            TrainingArguments(freeze_encoder_layers=spec)
    with pytest.raises(ValueError, match=r"freeze_encoder_layers '0-99': the model has 4 encoder layers \(0-3\)"):
        freeze_encoder_layers(tiny_model(), "0-99")
    assert len(freeze_encoder_layers(tiny_model(), "2-3")) > 0


def test_trainer_rechecks_arguments_changed_after_construction(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, progress=False)
    args.gradient_accumulation_steps = 0
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an integer >= 1"):
        Trainer(tiny_model(), args, ToyDataset(), collate)


# ---- 4. resume edge cases ---------------------------------------------------------------------------------

def test_resume_at_or_past_the_end_is_an_error(tmp_path):
    make_trainer(tmp_path / "run", max_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(checkpoint))} is at step 2, not before the end of "
                                              r"this run \(2 steps\)"):
        make_trainer(tmp_path / "again", max_steps=2).train(resume_from=str(checkpoint))
    state_file = checkpoint / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["global_step"] = 10 ** 9
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"is at step 1000000000, not before the end of this run \(5 steps\)"):
        make_trainer(tmp_path / "again", max_steps=5).train(resume_from=str(checkpoint))


@pytest.mark.parametrize("global_step", ["1", -1, 1.0, True, None])
def test_resume_refuses_a_malformed_state(tmp_path, global_step):
    make_trainer(tmp_path / "run", max_steps=1).train()
    state_file = tmp_path / "run" / "checkpoint-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    if global_step is None:
        del state["global_step"]
    else:
        state["global_step"] = global_step
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(state_file))}: global_step must be an integer >= 0"):
        make_trainer(tmp_path / "again", max_steps=4).train(resume_from=str(state_file.parent))


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"is not a camtl checkpoint: .*trainer_state\.pt is missing"):
        make_trainer(tmp_path / "run").train(resume_from=str(tmp_path / "empty"))


# ---- 5. work is never lost --------------------------------------------------------------------------------

def test_the_final_checkpoint_is_saved_before_the_final_evaluation(tmp_path):
    def crashing_metrics(task, preds, labels):
        raise RuntimeError("metric crashed")

    trainer = make_trainer(tmp_path, max_steps=2, eval_steps=100, save_steps=100,
                           eval_datasets={"rte": (0, ToyDataset(seed=1))}, compute_metrics=crashing_metrics)
    with pytest.raises(RuntimeError, match="metric crashed"):
        trainer.train()
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    assert {p.name for p in (tmp_path / "checkpoint-2").iterdir()} >= {"model.safetensors", "trainer_state.pt"}


class EmptyDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


def test_an_empty_dev_set_is_left_out_with_a_warning(tmp_path):
    evaluated = []

    def metrics(task, preds, labels):
        evaluated.append(task)
        assert len(preds) == len(labels) > 0
        return {"n": float(len(preds))}

    with pytest.warns(UserWarning, match="the evaluation set 'rte' has no example"):
        trainer = make_trainer(tmp_path, eval_datasets={"rte": (0, EmptyDataset()), "mnli": (2, ToyDataset(seed=1))},
                               compute_metrics=metrics)
    results = trainer.train()
    assert set(results) == {"mnli"} and evaluated and set(evaluated) == {2}
    preds, labels = trainer.predict(EmptyDataset())
    assert preds.shape == (0,) and labels.shape == (0,)


def test_a_failed_model_save_names_the_checkpoint_and_leaves_no_partial(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    path = tmp_path / "checkpoint-1"
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)

    def disk_full(folder, *args, **kwargs):
        (tmp_path / "checkpoint-1.partial" / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match=f"writing the checkpoint {re.escape(str(path))} failed .*No space left"):
        trainer.save_checkpoint(str(path))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]


def test_a_full_disk_in_torch_save_names_the_checkpoint_and_leaves_no_partial(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    path = tmp_path / "checkpoint-1"
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"writing the checkpoint {re.escape(str(path))} failed .*file write failed"):
        trainer.save_checkpoint(str(path))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]


# ---- 6. one run per output folder -------------------------------------------------------------------------

def test_a_second_trainer_on_the_same_output_dir_is_refused(tmp_path):
    second = make_trainer(tmp_path, max_steps=1)
    refusals = []

    def collate_and_try_the_second(items):
        if not refusals:
            with pytest.raises(OutputDirInUseError) as refusal:
                second.train()
            refusals.append(str(refusal.value))
        return collate(items)

    first = Trainer(tiny_model(), TrainingArguments(output_dir=str(tmp_path), max_steps=1, progress=False,
                                                    per_device_train_batch_size=4), ToyDataset(),
                    collate_and_try_the_second)
    first.train()
    assert refusals == [f"{tmp_path} is in use by another camtl training run (PID {os.getpid()}, holding "
                        f"{tmp_path / '.camtl.lock'}); wait for it to end or choose another output_dir"]
    assert second.global_step == 0
    second.train()  # the first run's lock went with it
    assert second.global_step == 1


def test_a_lock_held_by_another_process_blocks_until_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n", str(tmp_path / ".camtl.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        trainer = make_trainer(tmp_path, max_steps=1)
        with pytest.raises(OutputDirInUseError, match=f"PID {holder.pid}"):
            trainer.train()
    finally:
        holder.kill()
        holder.wait()
    trainer.train()  # the dead holder's lock file is still there, and blocks nothing
    assert trainer.global_step == 1 and (tmp_path / ".camtl.lock").exists()


# ---- 7. checkpoint rotation -------------------------------------------------------------------------------

def test_only_the_newest_checkpoints_are_kept(tmp_path):
    make_trainer(tmp_path, max_steps=5, save_steps=1, save_total_limit=2).train()
    assert checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-5"]
    other = tmp_path / "other"
    (other / "checkpoint-100").mkdir(parents=True)  # a higher step (an older, longer run): older or not,
    make_trainer(other, max_steps=3, save_steps=1, save_total_limit=1).train()  # the one just written stays
    assert checkpoints(other) == ["checkpoint-3"]


def test_skip_nonfinite_steps_under_fp16_lowers_the_scale(tmp_path):
    """fp16: a skipped step still tells the gradient scaler of the overflow (a lower scale), and nothing breaks."""
    dataset, hit = nan_regression_labels()
    trainer = make_trainer(tmp_path, dataset=dataset, max_steps=hit[0], fp16=True, skip_nonfinite_steps=True)
    scale_when_found, find = [], trainer._nonfinite

    def spy(logs):
        problem = find(logs)
        if problem is not None:
            scale_when_found.append(trainer.scaler.get_scale())
        return problem

    trainer._nonfinite = spy
    with pytest.warns(UserWarning, match=f"step {hit[0]}: .*step skipped"):
        trainer.train()
    assert trainer.skipped_nonfinite_steps == 1 and trainer.scaler.get_scale() == scale_when_found[0] / 2
    assert all_finite(trainer.model)
