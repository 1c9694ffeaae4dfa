"""The packing collator (camtl.data.PackingCollator) and training/evaluation on packed batches (issue 11, item 3).

The reference is the padded collator on the same items: one packed training step equals one padded step
(loss and every gradient, float64), and so do evaluation predictions and MT-Uncertainty selection.
"""

import copy
import shutil
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
    # atol: a gradient that is 0 in exact arithmetic (the key biases) is rounding noise (~1e-17) that AdamW
    # turns into an update of about lr * noise / eps (~1e-11); a real difference moves weights by ~lr = 1e-3.
    for name, p in padded_params.items():
        torch.testing.assert_close(packed_params[name], p, rtol=1e-10, atol=1e-9, msg=name)


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


def test_split_by_token_budget_caps_the_items_per_batch():
    items = [_item(2) for _ in range(7)]
    assert [len(b) for b in split_by_token_budget(items, 100, max_items=3)] == [3, 3, 1]
    assert [len(b) for b in split_by_token_budget(items, 5, max_items=3)] == [2, 2, 2, 1]


# ---- the token budget in the sampler -------------------------------------------------------------------------------

def _lengths(dataset):
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def _budget_sampler(sampling, budget=20, batch_size=100, seed=4, dataset=None):
    dataset = dataset or TypedToyDataset()
    from camtl.training import MultiTaskBatchSampler

    return MultiTaskBatchSampler(dataset.task_indices, batch_size, sampling, seed=seed, max_tokens_per_batch=budget,
                                 lengths=_lengths(dataset)), _lengths(dataset)


@pytest.mark.parametrize("sampling", ["proportional", "uniform"])
def test_budget_batches_fit_and_drop_no_example(sampling):
    """Each batch holds at most the budget (and the batch size); it closed because the next example did not fit;
    that example opens the next batch: over the draws, every example comes once before any comes twice."""
    budget = 20
    sampler, lengths = _budget_sampler(sampling, budget)
    dataset = TypedToyDataset()
    batches = [sampler.next_batch() for _ in range(30)]
    sizes = [sum(lengths[i] for i in b) for b in batches]
    assert all(0 < size <= budget for size in sizes)
    if sampling == "proportional":
        for batch, size, following in zip(batches, sizes, batches[1:]):
            assert size + lengths[following[0]] > budget  # closed by the budget, not earlier
        stream = [i for b in batches for i in b]
        n = len(dataset)
        assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    else:
        for t, indices in enumerate(dataset.task_indices):  # each task's cycle: no example skipped
            drawn = [i for b in batches for i in b if dataset[i]["task_id"] == t]
            assert len(drawn) >= len(indices) and sorted(drawn[:len(indices)]) == indices
        assert len({len(b) for b in batches}) > 1  # short examples make fuller batches
    capped, _ = _budget_sampler(sampling, budget=1000, batch_size=5)
    assert all(len(capped.next_batch()) == 5 for _ in range(10))  # the batch size caps as well


@pytest.mark.parametrize("sampling", ["proportional", "uniform", "mt_uncertainty"])
def test_budget_sampler_state_round_trips(sampling):
    a, _ = _budget_sampler(sampling)
    for _ in range(7):
        a.next_batch()
    b, _ = _budget_sampler(sampling)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch() for _ in range(9)] == [b.next_batch() for _ in range(9)]
    other, _ = _budget_sampler(sampling, budget=21)
    with pytest.raises(ValueError, match="max_tokens_per_batch 20.*max_tokens_per_batch 21"):
        other.load_state_dict(a.state_dict())


def test_budget_sampler_refuses_a_budget_below_the_longest_example():
    from camtl.training import MultiTaskBatchSampler

    dataset = TypedToyDataset()
    longest = max(_lengths(dataset))
    with pytest.raises(ValueError, match=f"max_tokens_per_batch={longest - 1} is less than the longest example "
                                         f"\\({longest} tokens\\)"):
        _budget_sampler("proportional", budget=longest - 1)
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="max_tokens_per_batch must be an int >= 1"):
            _budget_sampler("uniform", budget=bad)
    with pytest.raises(ValueError, match="needs the examples' lengths"):
        MultiTaskBatchSampler(dataset.task_indices, 4, max_tokens_per_batch=20)
    with pytest.raises(ValueError, match="TrainingArguments: max_tokens_per_batch must be an integer >= 1"):
        TrainingArguments(max_tokens_per_batch=0)


# ---- the token budget in training, MT-Uncertainty and evaluation -----------------------------------------------

def _collate_spy(collate, seen):
    def spy(items):
        seen.append([it["input_ids"] for it in items])
        return collate(items)
    return spy


@pytest.mark.parametrize("sampling", ["proportional", "uniform"])
def test_budget_step_trains_on_the_published_loss_of_its_batch(tmp_path, sampling):
    """One step with a budget: the batch is the sampler's (at most budget tokens), and the loss logged and
    trained on is the model's published loss of that batch (mean over the tasks present of the task means)."""
    budget = 24
    dataset = TypedToyDataset()
    model = perturbed_model()
    reference = copy.deepcopy(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=50,
                             progress=False, learning_rate=1e-3, warmup_proportion=0.0, max_grad_norm=0.0,
                             logging_steps=1, sampling=sampling, max_tokens_per_batch=budget)
    seen = []
    trainer = Trainer(model, args, dataset, _collate_spy(PackingCollator(MAX_LEN), seen))
    expected_indices, _ = _budget_sampler(sampling, budget, batch_size=50, seed=args.seed)
    indices = expected_indices.next_batch()
    grads = _gradient_spy(trainer)
    trainer.train()
    assert seen == [[dataset[i]["input_ids"] for i in indices]]
    assert sum(map(len, seen[0])) <= budget and len(seen[0]) >= 3
    batch = DynamicPaddingCollator(0, MAX_LEN)([dataset[i] for i in indices])
    out = reference(**batch)
    assert int((out.task_count > 0).sum()) >= 2
    out.loss.backward()
    logged = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r][0]
    assert logged["loss"] == pytest.approx(out.loss.item(), rel=1e-12)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert ref_grads.keys() == grads[0].keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("collate", [PackingCollator(MAX_LEN), DynamicPaddingCollator(0, MAX_LEN)],
                         ids=["packed", "padded"])
def test_mt_uncertainty_scores_candidates_within_the_budget(tmp_path, collate):
    """With a budget, the candidates are scored in forwards of at most budget tokens (packed or padded), and the
    batch is the longest run of them by decreasing entropy that fits the budget."""
    from camtl.training import mt_uncertainty_select

    budget = 25
    dataset = TypedToyDataset()
    args = TrainingArguments(output_dir=str(tmp_path), sampling="mt_uncertainty", per_device_train_batch_size=6,
                             max_steps=1, progress=False, max_tokens_per_batch=budget)
    model = perturbed_model(seed=2)
    seen = []
    trainer = Trainer(copy.deepcopy(model), args, dataset, _collate_spy(collate, seen))
    candidates = trainer.sampler.next_batch()
    assert len(candidates) == 6 * 3
    chosen = trainer._select(candidates)
    assert [ids for chunk in seen for ids in chunk] == [dataset[i]["input_ids"] for i in candidates]
    assert len(seen) > 1 and all(sum(map(len, chunk)) <= budget for chunk in seen)
    # The reference: every candidate scored in one padded forward, ranked, cut at the budget.
    with torch.no_grad():
        out = model.eval()(**{k: v for k, v in DynamicPaddingCollator(0, MAX_LEN)(
            [dataset[i] for i in candidates]).items() if k != "labels"})
    order = mt_uncertainty_select(out.entropy, torch.tensor([dataset[i]["task_id"] for i in candidates]),
                                  len(candidates)).tolist()
    ranked = [candidates[i] for i in order]
    tokens = np.cumsum([len(dataset[i]["input_ids"]) for i in ranked])
    expected = ranked[:int((tokens <= budget).sum())]
    assert chosen == expected and 2 <= len(chosen) < 6


def test_evaluation_with_a_budget_predicts_as_without(tmp_path):
    dataset = TypedToyDataset(sizes=(9, 8, 10), seed=3)
    model = perturbed_model(seed=1)
    budget = 15
    seen = []
    whole = Trainer(model, TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=64,
                                             progress=False), dataset, PackingCollator(MAX_LEN))
    budgeted = Trainer(copy.deepcopy(model), TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=64, progress=False, max_tokens_per_batch=budget),
        dataset, _collate_spy(PackingCollator(MAX_LEN), seen))
    preds, labels = whole.predict(dataset)
    budget_preds, budget_labels = budgeted.predict(dataset)
    assert len(seen) > 3 and all(sum(map(len, chunk)) <= budget for chunk in seen)
    assert [ids for chunk in seen for ids in chunk] == [dataset[i]["input_ids"] for i in range(len(dataset))]
    np.testing.assert_array_equal(budget_labels, labels)
    np.testing.assert_allclose(budget_preds, preds, rtol=1e-5)


# ---- seeds and resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling, budget", [("proportional", None), ("uniform", None), ("mt_uncertainty", None),
                                              ("proportional", 30), ("uniform", 30), ("mt_uncertainty", 30)])
def test_packed_and_padded_runs_see_the_same_examples_in_order(tmp_path, sampling, budget, monkeypatch):
    seen = {}
    steps = 4
    for name, collate in (("padded", DynamicPaddingCollator(0, MAX_LEN)), ("packed", PackingCollator(MAX_LEN))):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=5,
                                 sampling=sampling, progress=False, learning_rate=1e-3, save_steps=100,
                                 max_tokens_per_batch=budget)
        trainer = Trainer(perturbed_model(), args, TypedToyDataset(), collate)
        seen[name] = []
        micro_step = trainer._micro_step
        trainer._micro_step = lambda indices, scale, log=seen[name]: log.append(list(indices)) or micro_step(
            indices, scale)
        trainer.train()
    assert len(seen["packed"]) == steps and seen["packed"] == seen["padded"]
    assert len({tuple(b) for b in seen["packed"]}) == steps  # the steps differ


@pytest.mark.parametrize("sampling", ["proportional", "uniform", "mt_uncertainty"])
def test_packed_resume_with_a_budget_is_exact(sampling, tmp_path):
    """Stopped after 3 steps and resumed from its checkpoint, a packed run with a token budget ends where the
    run without a stop does: the sampler's state (its place in the stream) is in the checkpoint."""
    def run(steps_before_stop=None):
        model = tiny_model()
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                                 sampling=sampling, save_steps=3, progress=False, learning_rate=1e-3,
                                 max_tokens_per_batch=20)
        trainer = Trainer(model, args, TypedToyDataset(), PackingCollator(MAX_LEN))
        if steps_before_stop:
            trainer.total_steps = steps_before_stop
            trainer.train()
            model = tiny_model(seed=123)
            trainer = Trainer(model, args, TypedToyDataset(), PackingCollator(MAX_LEN))
            trainer.train(resume_from=str(tmp_path / "run" / f"checkpoint-{steps_before_stop}"))
        else:
            trainer.train()
        return model.state_dict(), trainer.sampler.state_dict()

    straight, straight_sampler = run()
    resumed, resumed_sampler = run(steps_before_stop=3)
    assert straight_sampler == resumed_sampler
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    initial = tiny_model().state_dict()
    assert sum(not torch.equal(straight[k], initial[k]) for k in straight) > 50


# ---- the CLI: packing by default, the fallback, the token budget ---------------------------------------------------

def _count_collators(monkeypatch):
    """Counts the batches each collator makes (and their tokens) during CLI runs."""
    calls = {"packed": [], "padded": []}
    for cls, key in ((PackingCollator, "packed"), (DynamicPaddingCollator, "padded")):
        original = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, items, original=original, key=key: calls[key].append(
            sum(len(it["input_ids"]) for it in items)) or original(self, items))
    return calls


def test_cli_packs_by_default_and_predicts_as_padded(tmp_path, monkeypatch, capsys):
    """eval and predict pack unless --no-packing; the metrics and every prediction file are the padded ones."""
    from camtl import cli
    from camtl.data import toy
    from test_cli_safety import make_model_folder

    model = make_model_folder(tmp_path / "model")
    data = tmp_path / "data"
    toy.write(data, seed=3, n_train=8, n_dev=12, n_test=11, tasks=["topic"])
    calls = _count_collators(monkeypatch)
    printed, files = {}, {}
    for flags in ([], ["--no-packing"], ["--max_tokens_per_batch", "20"]):
        key = " ".join(flags) or "default"
        before = {k: len(v) for k, v in calls.items()}
        assert cli.main(["eval", "--model_name_or_path", str(model), "--data_dir", str(data), *flags]) == 0
        out = tmp_path / f"preds {key}"
        assert cli.main(["predict", "--model_name_or_path", str(model), "--data_dir", str(data),
                         "--output_dir", str(out), *flags]) == 0
        captured = capsys.readouterr()
        assert "packing is off" not in captured.err
        printed[key] = captured.out.splitlines()[0]
        files[key] = {p.name: p.read_text() for p in out.iterdir()}
        used = {k: len(v) - before[k] for k, v in calls.items()}
        assert (used["packed"] > 0, used["padded"] > 0) == ((False, True) if flags == ["--no-packing"]
                                                             else (True, False)), (key, used)
    assert "accuracy" in printed["default"] and printed["default"] == printed["--no-packing"]
    assert printed["--max_tokens_per_batch 20"] == printed["default"]
    assert files["default"] == files["--no-packing"] == files["--max_tokens_per_batch 20"]
    assert len(files["default"]) == 1 and len(next(iter(files["default"].values())).splitlines()) == 12
    budgeted = calls["packed"][-4:]  # the predict run with the budget: batches of at most 20 tokens
    assert all(tokens <= 20 for tokens in budgeted)


def test_cli_falls_back_to_padding_in_one_line_when_the_model_cannot_pack(tmp_path, monkeypatch, capsys):
    """A backend without a packed (varlen) op: training and evaluation pad, and say so once; no error."""
    from camtl import cli
    from camtl.backends import BackendUnavailableError
    from camtl.data import toy
    from camtl.models import CaMtl

    forward = CaMtl.forward

    def no_varlen(self, *args, position_ids=None, cu_seqlens=None, **kwargs):
        if position_ids is not None or cu_seqlens is not None:
            raise BackendUnavailableError("camtl backend 'test' cannot run 'conditional_attention': no varlen kernel")
        return forward(self, *args, position_ids=position_ids, cu_seqlens=cu_seqlens, **kwargs)

    monkeypatch.setattr(CaMtl, "forward", no_varlen)
    calls = _count_collators(monkeypatch)
    data, out = tmp_path / "data", tmp_path / "out"
    toy.write(data, seed=1, n_train=24, n_dev=8, n_test=6)
    for flags in ([], ["--packing"]):
        shutil.rmtree(out, ignore_errors=True)
        assert cli.main(["train", "--data_dir", str(data), "--output_dir", str(out), "--max_steps", "1",
                         "--per_device_train_batch_size", "8", "--max_seq_length", "64", *flags]) == 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "packing is off" in line]
        assert lines == ["camtl: packing is off, batches are padded: camtl backend 'test' cannot run "
                         "'conditional_attention': no varlen kernel"], err
    assert cli.main(["eval", "--data_dir", str(data), "--model_name_or_path", str(out)]) == 0
    assert capsys.readouterr().err.count("packing is off") == 1
    assert calls["packed"] == [] and len(calls["padded"]) > 3


def test_cli_train_packs_by_default_within_the_token_budget(tmp_path, monkeypatch):
    from camtl import cli
    from camtl.data import toy

    calls = _count_collators(monkeypatch)
    data, out = tmp_path / "data", tmp_path / "out"
    toy.write(data, seed=1, n_train=24, n_dev=8, n_test=6)
    assert cli.main(["train", "--data_dir", str(data), "--output_dir", str(out), "--max_steps", "3",
                     "--per_device_train_batch_size", "64", "--max_seq_length", "64", "--logging_steps", "1",
                     "--max_tokens_per_batch", "64", "--eval_steps", "100"]) == 0
    assert calls["padded"] == [] and len(calls["packed"]) >= 3
    assert all(0 < tokens <= 64 for tokens in calls["packed"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log
                                                                      if "loss" in r)
    state = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert state["sampler"]["max_tokens_per_batch"] == 64 and state["args"]["max_tokens_per_batch"] == 64


def test_a_sampler_state_from_before_the_budget_still_loads():
    """Checkpoints written before the token budget have no 'max_tokens_per_batch' or 'stream': no budget."""
    from camtl.training import MultiTaskBatchSampler

    dataset = TypedToyDataset()
    a = MultiTaskBatchSampler(dataset.task_indices, 4, "uniform", seed=3)
    for _ in range(5):
        a.next_batch()
    old = {k: v for k, v in a.state_dict().items() if k not in ("max_tokens_per_batch", "stream")}
    b = MultiTaskBatchSampler(dataset.task_indices, 4, "uniform", seed=3)
    b.load_state_dict(old)
    assert [a.next_batch() for _ in range(4)] == [b.next_batch() for _ in range(4)]
    budgeted, _ = _budget_sampler("uniform", seed=3)
    with pytest.raises(ValueError, match="max_tokens_per_batch None.*max_tokens_per_batch 20"):
        budgeted.load_state_dict(old)
