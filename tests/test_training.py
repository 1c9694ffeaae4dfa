"""Samplers, MT-Uncertainty selection, freezing, exact resume and DDP equivalence."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from camtl.models import CaMtl
from camtl.models.camtl_model import CaMtlOutput
from camtl.training import MultiTaskBatchSampler, Trainer, TrainingArguments, mt_uncertainty_select

TASK_LABELS = [2, 1, 3]


class ToyDataset(torch.utils.data.Dataset):
    """Random token sequences of random lengths, 3 tasks of different sizes."""

    def __init__(self, sizes=(12, 7, 9), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items, self.task_indices = [], []
        for t, n in enumerate(sizes):
            self.task_indices.append(list(range(len(self.items), len(self.items) + n)))
            for _ in range(n):
                L = int(torch.randint(3, 10, (1,), generator=g))
                label = float(torch.rand(1, generator=g) * 5) if TASK_LABELS[t] == 1 \
                    else float(torch.randint(0, TASK_LABELS[t], (1,), generator=g))
                self.items.append({"input_ids": torch.randint(1, 50, (L,), generator=g).tolist(),
                                   "label": label, "task_id": t})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    L = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), L, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[b, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([it["label"] for it in items]), "task_id": torch.tensor([it["task_id"] for it in items])}


def tiny_model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    model = CaMtl(config, task_num_labels=TASK_LABELS, max_seq_length=12)
    for decoder in model.decoders:
        decoder.dropout.p = dropout  # the heads' published dropout is 0.1; 0 makes runs comparable
    return model


# ---- samplers ------------------------------------------------------------------------------------------------

def test_proportional_epoch_covers_every_example_once():
    task_indices = [list(range(0, 10)), list(range(10, 16))]
    s = MultiTaskBatchSampler(task_indices, batch_size=4, sampling="proportional", seed=3)
    epoch = [i for batch in s for i in batch]
    assert len(epoch) == 16 and sorted(epoch) == list(range(16))
    assert epoch != sorted(epoch)


def test_sampler_state_round_trip_and_modes():
    task_indices = [list(range(0, 10)), list(range(10, 13)), list(range(13, 40))]
    for mode in ("proportional", "uniform", "mt_uncertainty"):
        a = MultiTaskBatchSampler(task_indices, 6, mode, seed=1)
        for _ in range(5):
            a.next_batch()
        b = MultiTaskBatchSampler(task_indices, 6, mode, seed=1)
        b.load_state_dict(a.state_dict())
        assert [a.next_batch() for _ in range(4)] == [b.next_batch() for _ in range(4)]
    cands = MultiTaskBatchSampler(task_indices, 6, "mt_uncertainty", seed=1).next_batch()
    assert len(cands) == 18 and sum(10 <= i < 13 for i in cands) == 6  # the 3-example task cycles
    uni = MultiTaskBatchSampler(task_indices, 3000, "uniform", seed=2).next_batch()
    share = np.bincount([0 if i < 10 else 1 if i < 13 else 2 for i in uni]) / 3000
    assert np.all(np.abs(share - 1 / 3) < 0.05)


def test_mt_uncertainty_select_by_hand():
    entropy = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2, 0.6])
    task_id = torch.tensor([0, 0, 1, 1, 2, 2])
    assert mt_uncertainty_select(entropy, task_id, 3).tolist() == [0, 3, 5]
    # Published: × task mean / max task mean. Means: 0.5, 0.6, 0.4 -> factors 5/6, 1, 2/3.
    # Scores: .75, .0833, .5, .7, .1333, .4 -> top 3: 0, 3, 2.
    assert mt_uncertainty_select(entropy, task_id, 3, published=True).tolist() == [0, 3, 2]
    # STS-B copies MRPC's scores (tasks named mrpc=0, sts-b=2): scores of 4, 5 become .75, .0833.
    assert mt_uncertainty_select(entropy, task_id, 2, published=True, task_names=["mrpc", "rte", "sts-b"]).tolist() \
        == [0, 4]


def _normalized_entropy_by_hand(logits, task_id):
    """Each row's H(softmax over its task's C classes) / log C, in numpy float64 (independent of the model)."""
    rows = []
    for row, t in zip(logits.double().numpy(), task_id.tolist()):
        z = row[: TASK_LABELS[t]]
        p = np.exp(z - z.max())
        p /= p.sum()
        rows.append(-(p * np.log(p)).sum() / np.log(TASK_LABELS[t]) if TASK_LABELS[t] > 1 else 0.0)
    return np.array(rows)


def _masked(logits, task_id):
    """-inf past each row's task's classes, as CaMtl's logits."""
    valid = torch.arange(logits.shape[1])[None, :] < torch.tensor(TASK_LABELS)[task_id][:, None]
    return logits.masked_fill(~valid, float("-inf"))


def test_mt_uncertainty_keeps_the_highest_normalized_entropy():
    """Scores are H / log C (not H): a 2-class row (H 0.62) beats a 3-class row with a larger H (0.69)."""
    task_id = torch.tensor([2, 0, 2, 0, 2, 0])  # C = 3, 2, 3, 2, 3, 2
    logits = _masked(torch.tensor([[4.0, -2.0, 0.5], [3.0, -3.0, 0.0],  # confident: low scores, listed first
                                   [0.0, 0.0, -20.0], [0.0, 0.0, 0.0],  # H = log 2 for both: 0.631 vs 1.0
                                   [0.3, -0.2, 0.1], [0.8, 0.0, 0.0]]), task_id)  # H 1.08, 0.62: 0.982, 0.893
    entropy = CaMtl._normalized_entropy(logits, torch.tensor(TASK_LABELS)[task_id])
    np.testing.assert_allclose(entropy.double().numpy(), _normalized_entropy_by_hand(logits, task_id), rtol=1e-5)
    # By hand: scores [0.14, 0.03, 0.63, 1.0, 0.98, 0.89] -> ranking 3, 4, 5, 2 (by H alone: 4, 2, 3, 5).
    assert mt_uncertainty_select(entropy, task_id, 3).tolist() == [3, 4, 5]
    assert mt_uncertainty_select(entropy, task_id, 4).tolist() == [3, 4, 5, 2]


def test_trainer_selects_the_most_uncertain_candidates(tmp_path, monkeypatch):
    """Trainer._select keeps the batch_size candidates of highest H / log C, whatever their place or task."""
    dataset = ToyDataset()
    trainer = Trainer(tiny_model(), TrainingArguments(output_dir=str(tmp_path), sampling="mt_uncertainty",
                                                      per_device_train_batch_size=4, max_steps=1, progress=False),
                      dataset, collate)
    candidates = trainer.sampler.next_batch()
    task_id = torch.tensor([dataset[i]["task_id"] for i in candidates])
    logits = _masked(torch.randn(len(candidates), max(TASK_LABELS)) * 2, task_id)
    entropy = CaMtl._normalized_entropy(logits, torch.tensor(TASK_LABELS)[task_id])

    def scored_forward(**batch):
        assert torch.equal(batch["task_id"], task_id) and "labels" not in batch
        return CaMtlOutput(logits=logits, entropy=entropy)

    monkeypatch.setattr(trainer.model, "forward", scored_forward)
    ranking = np.argsort(-_normalized_entropy_by_hand(logits, task_id), kind="stable")
    expected = [candidates[i] for i in ranking[:4]]
    assert expected != candidates[:4]
    assert trainer._select(candidates) == expected


def test_one_sgd_step_follows_the_mean_over_tasks_of_each_task_mean(tmp_path, monkeypatch):
    """The published loss: mean over the tasks present of each task's mean loss (not the mean over examples)."""
    lr = 0.5
    monkeypatch.setattr(Trainer, "_optimizer", lambda self: torch.optim.SGD(
        [p for p in self.model.parameters() if p.requires_grad], lr=self.args.learning_rate))
    model = tiny_model(dropout=0.0).double()
    initial = copy.deepcopy(model)
    dataset = ToyDataset()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, progress=False,
                             learning_rate=lr, warmup_proportion=0.0, max_grad_norm=0.0, logging_steps=1)
    trainer = Trainer(model, args, dataset, collate)

    batch = collate([dataset[i] for i in MultiTaskBatchSampler(dataset.task_indices, 8, seed=args.seed).next_batch()])
    counts = torch.bincount(batch["task_id"], minlength=3)
    assert (counts > 0).sum() >= 2 and len(set(counts[counts > 0].tolist())) >= 2  # unequal tasks: means differ
    initial.train()
    logits = initial(**{k: v for k, v in batch.items() if k != "labels"}).logits
    task_means = []
    for t, num_labels in enumerate(TASK_LABELS):
        rows = batch["task_id"] == t
        if rows.any():
            labels = batch["labels"][rows].double()
            task_means.append(((logits[rows, 0] - labels) ** 2).mean() if num_labels == 1 else
                              torch.nn.functional.cross_entropy(logits[rows, :num_labels], labels.long()))
    expected_loss = torch.stack(task_means).mean()
    params = dict(initial.named_parameters())
    grads = torch.autograd.grad(expected_loss, list(params.values()), allow_unused=True)

    trainer.train()
    logged = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert abs(logged[0]["loss"] - expected_loss.item()) <= 1e-10 * expected_loss.item()
    trained = dict(model.named_parameters())
    moved = 0
    for (name, before), grad in zip(params.items(), grads):
        expected_step = -lr * (grad if grad is not None else torch.zeros_like(before))
        torch.testing.assert_close(trained[name].detach() - before.detach(), expected_step, rtol=1e-9, atol=1e-12,
                                   msg=name)
        moved += bool(expected_step.abs().max() > 1e-6)
    assert moved > 50


def _optimizer_step_spy(trainer):
    """Records, at each optimizer step, the learning rate and a copy of every trainable gradient."""
    seen = []

    def record(optimizer, args, kwargs):
        seen.append((optimizer.param_groups[0]["lr"],
                     {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))

    trainer.optimizer.register_step_pre_hook(record)
    return seen


def test_learning_rate_warms_up_then_decays_linearly(tmp_path):
    """Step s (from 0) trains at lr·(s+1)/W for s < W, then lr·(T-s)/(T-W): W = int(warmup_proportion·T)."""
    lr, total, warmup = 1e-3, 10, 3
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=total, warmup_proportion=0.3,
                             per_device_train_batch_size=4, progress=False, learning_rate=lr)
    trainer = Trainer(tiny_model(), args, ToyDataset(), collate)
    seen = _optimizer_step_spy(trainer)
    for _ in range(total):
        trainer.train_step()
    expected = [lr * ((s + 1) / warmup if s < warmup else (total - s) / (total - warmup)) for s in range(total)]
    np.testing.assert_allclose([rate for rate, _ in seen], expected, rtol=1e-12)


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    max_norm = 1e-3
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, progress=False,
                             max_grad_norm=max_norm)
    trainer = Trainer(tiny_model(), args, ToyDataset(), collate)
    seen = _optimizer_step_spy(trainer)
    for _ in range(2):
        logs = trainer.train_step()
        assert logs["grad_norm"] > 10 * max_norm  # the norm before clipping: clipping has work to do
    for _, grads in seen:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert abs(norm.item() - max_norm) <= 1e-4 * max_norm  # clip_grad_norm_ divides by norm + 1e-6


def test_accumulated_gradient_is_the_mean_of_the_micro_batches(tmp_path):
    """With gradient_accumulation_steps=k, the step's gradient is the mean of the k micro-batches' loss gradients."""
    model = tiny_model(dropout=0.0).double()
    initial = copy.deepcopy(model)
    dataset = ToyDataset()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, progress=False,
                             gradient_accumulation_steps=3, max_grad_norm=0.0)
    trainer = Trainer(model, args, dataset, collate)
    drawn = []
    real_micro_step = trainer._micro_step

    def micro_step(indices, scale):
        drawn.append(list(indices))
        return real_micro_step(indices, scale)

    trainer._micro_step = micro_step
    seen = _optimizer_step_spy(trainer)
    trainer.train_step()
    assert len(drawn) == 3 and len(seen) == 1

    initial.train()
    expected = {n: torch.zeros_like(p) for n, p in initial.named_parameters()}
    for indices in drawn:
        initial.zero_grad()
        initial(**collate([dataset[i] for i in indices])).loss.backward()
        for n, p in initial.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad / 3
    grads = seen[0][1]
    assert len(grads) > 50
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[n], rtol=1e-9, atol=1e-12, msg=n)


# ---- freezing, resume, DDP -------------------------------------------------------------------------------------

def test_freeze_keeps_conditional_modules_trainable(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path), freeze_encoder_layers="0-2", progress=False,
                                               per_device_train_batch_size=4, max_steps=1), ToyDataset(), collate)
    params = dict(model.named_parameters())
    assert not params["bert.encoder.layer.1.attention.self.query.weight"].requires_grad
    assert not params["bert.embeddings.word_embeddings.weight"].requires_grad
    assert params["bert.encoder.layer.1.attention.self.random_weight_matrix"].requires_grad
    assert params["bert.encoder.layer.2.output.LayerNorm.ln_weight_modulation.gb_weights.weight"].requires_grad
    assert params["bert.encoder.layer.3.adapter.bottleneck.down_proj_layer.weight"].requires_grad
    assert params["bert.encoder.layer.3.new_attention.self.query.weight"].requires_grad
    trainer.train()
    frozen = params["bert.encoder.layer.1.attention.self.query.weight"]
    assert frozen.grad is None and frozen not in trainer.optimizer.state
    assert len(trainer.optimizer.state) > 0


@pytest.mark.parametrize("sampling", ["proportional", "mt_uncertainty"])
def test_resume_is_exact(sampling, tmp_path):
    def run(steps_before_stop=None):
        model = tiny_model()
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                                 sampling=sampling, save_steps=3, progress=False, learning_rate=1e-3)
        trainer = Trainer(model, args, ToyDataset(), collate)
        if steps_before_stop:
            trainer.total_steps = steps_before_stop  # an interrupted run: stops after its checkpoint
            trainer.train()
            model = tiny_model(seed=123)  # a fresh process: other weights, other RNG
            trainer = Trainer(model, args, ToyDataset(), collate)
            trainer.train(resume_from=str(tmp_path / "run" / f"checkpoint-{steps_before_stop}"))
        else:
            trainer.train()
        return model.state_dict()

    straight = run()
    resumed = run(steps_before_stop=3)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    initial = tiny_model().state_dict()
    assert sum(not torch.equal(straight[k], initial[k]) for k in straight) > 50  # training did move the weights


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, progress=False)
    trainer = Trainer(model, args, ToyDataset(), collate)
    trainer.train()
    path = tmp_path / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a different state, whose save fails half-way

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"{re.escape(str(path))}.*No space left") as failure:
        trainer.save_checkpoint(str(path))
    assert failure.value.errno == 28
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # model.safetensors was not overwritten
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    monkeypatch.undo()
    trainer.save_checkpoint(str(path))  # the next save clears the partial one and replaces the old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert (path / "model.safetensors").read_bytes() != before["model.safetensors"]


DDP_SCRIPT = Path(__file__).with_name("ddp_worker.py")


def test_ddp_two_processes_equal_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    subprocess.run([sys.executable, str(DDP_SCRIPT), str(one), "8"], check=True, env=env, cwd=DDP_SCRIPT.parent)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(DDP_SCRIPT), str(two), "4"], check=True, env=env, cwd=DDP_SCRIPT.parent,
                   capture_output=True)
    a, b = torch.load(one), torch.load(two)
    moved = 0
    initial = tiny_model(dropout=0.0).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(a[k], initial[k])
    assert moved > 50  # training changed the parameters
