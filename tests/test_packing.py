"""The packing collator (camtl.data.PackingCollator) and training/evaluation on packed batches (issue 11, item 3).

The reference is the padded collator on the same items: one packed training step equals one padded step
(loss and every gradient, float64), and so do evaluation predictions and MT-Uncertainty selection.
"""

import copy
import json

import numpy as np
import pytest
import torch

from camtl.data import DynamicPaddingCollator, PackingCollator, split_by_token_budget
from camtl.training import Trainer, TrainingArguments
from test_training import TASK_LABELS, ToyDataset, tiny_model

MAX_LEN = 12


class TypedToyDataset(ToyDataset):
    """ToyDataset's items as MultiTaskDataset gives them: with token_type_ids (random 0/1) and attention_mask."""

    def __init__(self, sizes=(12, 7, 9), seed=0, labeled=True):
        super().__init__(sizes, seed)
        g = torch.Generator().manual_seed(seed + 1)
        for it in self.items:
            n = len(it["input_ids"])
            it["token_type_ids"] = torch.randint(0, 2, (n,), generator=g).tolist()
            it["attention_mask"] = [1] * n
            if not labeled:
                it["label"] = None


def perturbed_model(seed=0):
    """The tiny model in float64, dropout 0, with random weights everywhere (CBDA and FiLM start at zero)."""
    model = tiny_model(seed, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double()


# ---- the collator ----------------------------------------------------------------------------------------------

def test_packed_batch_holds_each_item_end_to_end():
    dataset = TypedToyDataset()
    items = [dataset[i] for i in (3, 20, 0, 14, 27)]  # three tasks, mixed
    batch = PackingCollator(MAX_LEN)(items)
    lengths = [len(it["input_ids"]) for it in items]
    N = sum(lengths)
    assert "attention_mask" not in batch
    for key in ("input_ids", "token_type_ids", "position_ids"):
        assert batch[key].shape == (1, N) and batch[key].dtype == torch.long, key
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, *np.cumsum(lengths)]
    assert batch["max_seqlen"] == max(lengths) and type(batch["max_seqlen"]) is int
    assert batch["task_id"].tolist() == [it["task_id"] for it in items] and batch["task_id"].dtype == torch.long
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([it["label"] for it in items], rel=1e-7)
    cu = batch["cu_seqlens"].tolist()
    for s, it in enumerate(items):
        a, b = cu[s], cu[s + 1]
        assert batch["input_ids"][0, a:b].tolist() == it["input_ids"]
        assert batch["token_type_ids"][0, a:b].tolist() == it["token_type_ids"]
        assert batch["position_ids"][0, a:b].tolist() == list(range(lengths[s]))
    # The padded collator's real tokens, row by row, are the packed tokens.
    padded = DynamicPaddingCollator(0, MAX_LEN)(items)
    real = padded["attention_mask"].bool()
    assert torch.equal(padded["input_ids"][real], batch["input_ids"][0])
    assert torch.equal(padded["token_type_ids"][real], batch["token_type_ids"][0])
    assert torch.equal(padded["labels"], batch["labels"]) and torch.equal(padded["task_id"], batch["task_id"])


def test_unlabeled_items_give_no_labels():
    dataset = TypedToyDataset(labeled=False)
    batch = PackingCollator(MAX_LEN)([dataset[i] for i in range(4)])
    assert "labels" not in batch and batch["task_id"].shape == (4,)


def _item(n=4, **changes):
    item = {"input_ids": list(range(1, n + 1)), "token_type_ids": [0] * n, "attention_mask": [1] * n,
            "label": 1, "task_id": 0}
    item.update(changes)
    return item


@pytest.mark.parametrize("items, message", [
    ([], "empty batch"),
    ([_item(), _item(input_ids=[], token_type_ids=[], attention_mask=[])], "item 1 has no tokens"),
    ([_item(MAX_LEN + 1)], f"item 0 has {MAX_LEN + 1} tokens, more than max_seq_length={MAX_LEN}"),
    ([_item(token_type_ids=[0, 0, 1])], "item 0: input_ids and token_type_ids differ in length: 4, 3"),
    ([_item(), _item(attention_mask=[1, 1, 0, 0])], "item 1: attention_mask must be 4 ones"),
    ([_item(attention_mask=[1, 1, 1])], "item 0: attention_mask must be 4 ones"),
    ([_item(), _item(label=None)], "mixes labeled and unlabeled"),
])
def test_bad_items_are_refused_by_name(items, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        PackingCollator(MAX_LEN)(items)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_bad_max_seq_length_is_refused(bad):
    with pytest.raises(ValueError, match="max_seq_length must be an int >= 1"):
        PackingCollator(bad)


# ---- training and evaluation -----------------------------------------------------------------------------------

def _gradient_spy(trainer):
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append(
        {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
    return seen


def _one_step(tmp_path, collate, sampling="proportional"):
    dataset = TypedToyDataset()
    model = perturbed_model()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, progress=False,
                             learning_rate=1e-3, warmup_proportion=0.0, max_grad_norm=0.0, logging_steps=1,
                             sampling=sampling)
    trainer = Trainer(model, args, dataset, collate)
    grads = _gradient_spy(trainer)
    trainer.train()
    logged = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    return logged[0], grads[0], dict(model.named_parameters())


@pytest.mark.parametrize("sampling", ["proportional", "mt_uncertainty"])
def test_one_packed_step_equals_one_padded_step(tmp_path, sampling):
    """Same seed and examples: the loss (mean over tasks of the task means), every task loss, every gradient
    and the updated weights agree in float64."""
    padded_log, padded_grads, padded_params = _one_step(tmp_path / "padded", DynamicPaddingCollator(0, MAX_LEN),
                                                        sampling)
    packed_log, packed_grads, packed_params = _one_step(tmp_path / "packed", PackingCollator(MAX_LEN), sampling)
    assert sum(k.startswith("loss/") for k in padded_log) >= 2  # several tasks in the step
    for key, value in padded_log.items():
        if key.startswith("loss"):
            assert packed_log[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert packed_log["grad_norm"] == pytest.approx(padded_log["grad_norm"], rel=1e-10)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 50
    nonzero = 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
        nonzero += bool(grad.abs().max() > 1e-8)
    assert nonzero > 50
    for name, p in padded_params.items():
        torch.testing.assert_close(packed_params[name], p, rtol=1e-10, atol=1e-12, msg=name)


def test_packed_evaluation_predicts_as_padded(tmp_path):
    dataset = TypedToyDataset(sizes=(9, 8, 10), seed=3)
    model = perturbed_model(seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=6, progress=False)
    padded = Trainer(model, args, dataset, DynamicPaddingCollator(0, MAX_LEN))
    packed = Trainer(copy.deepcopy(model), args, dataset, PackingCollator(MAX_LEN))
    padded_preds, padded_labels = padded.predict(dataset)
    packed_preds, packed_labels = packed.predict(dataset)
    assert packed_preds.shape == (len(dataset),)
    np.testing.assert_array_equal(packed_labels, padded_labels)
    regression = np.array([TASK_LABELS[dataset[i]["task_id"]] == 1 for i in range(len(dataset))])
    np.testing.assert_array_equal(packed_preds[~regression], padded_preds[~regression])  # class ids
    assert len(set(packed_preds[~regression].tolist())) >= 2
    np.testing.assert_allclose(packed_preds[regression], padded_preds[regression], rtol=1e-5)  # float32 scores


def test_packed_candidates_are_selected_as_padded(tmp_path):
    """MT-Uncertainty scores packed candidates per sequence: the same top batch as padded."""
    dataset = TypedToyDataset()
    args = TrainingArguments(output_dir=str(tmp_path), sampling="mt_uncertainty", per_device_train_batch_size=4,
                             max_steps=1, progress=False)
    model = perturbed_model(seed=2)
    padded = Trainer(model, args, dataset, DynamicPaddingCollator(0, MAX_LEN))
    packed = Trainer(copy.deepcopy(model), args, dataset, PackingCollator(MAX_LEN))
    candidates = padded.sampler.next_batch()
    assert packed.sampler.next_batch() == candidates
    chosen = packed._select(candidates)
    assert chosen == padded._select(candidates)
    assert len(chosen) == 4 and chosen != candidates[:4]


# ---- the CLI ----------------------------------------------------------------------------------------------------

def test_cli_packing_flag_trains_and_evaluates_as_padded(tmp_path, monkeypatch, capsys):
    """`camtl train --packing` trains on packed batches; `camtl eval --packing` gives the padded metrics.

    (Training runs with dropout, whose random masks depend on the batch's shape: one packed step equals one
    padded step only without dropout, which test_one_packed_step_equals_one_padded_step checks.)"""
    from camtl import cli
    from camtl.data import toy

    packed_calls = []
    pack = PackingCollator.__call__
    monkeypatch.setattr(PackingCollator, "__call__", lambda self, items: packed_calls.append(len(items))
                        or pack(self, items))
    data, out = tmp_path / "data", tmp_path / "out"
    toy.write(data, seed=1, n_train=24, n_dev=8, n_test=6)
    assert cli.main(["train", "--data_dir", str(data), "--output_dir", str(out), "--max_steps", "2",
                     "--per_device_train_batch_size", "8", "--max_seq_length", "64", "--logging_steps", "1",
                     "--use_mt_uncertainty", "--packing"]) == 0
    assert packed_calls[:2] == [8 * 4, 8]  # MT-Uncertainty: 8 candidates per task (4 tasks), then the top 8
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    printed = {}
    for flag in ("--no-packing", "--packing"):
        calls_before = len(packed_calls)
        capsys.readouterr()
        assert cli.main(["eval", "--data_dir", str(data), "--model_name_or_path", str(out), flag]) == 0
        assert (len(packed_calls) > calls_before) == (flag == "--packing")
        printed[flag] = capsys.readouterr().out
    assert "accuracy" in printed["--packing"] and printed["--packing"] == printed["--no-packing"]


# ---- the token budget --------------------------------------------------------------------------------------------

def test_split_by_token_budget_keeps_order_and_fills_each_batch():
    rng = np.random.default_rng(5)
    items = [_item(int(n)) for n in rng.integers(1, MAX_LEN + 1, size=40)]
    budget = 20
    batches = split_by_token_budget(items, budget)
    assert [it for batch in batches for it in batch] == items  # every item once, in order
    sizes = [sum(len(it["input_ids"]) for it in batch) for batch in batches]
    assert all(0 < size <= budget for size in sizes)
    # Greedy: each batch closed only because the next item did not fit.
    for batch, next_batch, size in zip(batches, batches[1:], sizes):
        assert size + len(next_batch[0]["input_ids"]) > budget
    assert len(batches) < len(items)  # several items share batches
    packed = PackingCollator(MAX_LEN)(batches[0])
    assert packed["input_ids"].shape[1] == sizes[0] <= budget
    assert split_by_token_budget([], budget) == []


def test_split_by_token_budget_refuses_an_item_over_the_budget():
    with pytest.raises(ValueError, match="item 1 has 9 tokens, more than max_tokens_per_batch=8"):
        split_by_token_budget([_item(3), _item(9)], 8)
    with pytest.raises(ValueError, match="max_tokens_per_batch must be an int >= 1"):
        split_by_token_budget([_item(3)], 0)
