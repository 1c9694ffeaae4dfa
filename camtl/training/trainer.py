"""Multi-task training of ``camtl.models.CaMtl``: sampling, optimization, evaluation, checkpoints, DDP.

- Batches come from ``MultiTaskBatchSampler`` (proportional, uniform or
  MT-Uncertainty). With MT-Uncertainty, each step scores batch_size candidates
  per task with the model (in eval mode, or in train mode with the published
  switch) and trains on the top batch_size.
- AdamW with linear warmup (warmup_proportion of the steps) then linear decay,
  gradient clipping, bf16/fp16 autocast (fp16 with a gradient scaler),
  gradient accumulation.
- Under ``torchrun`` (DDP), every process draws the same global batch and takes
  its slice; the loss is the global published loss (mean over the tasks
  present of each task's mean), so N processes train like one with the same
  global batch.
- Checkpoints hold the model, optimizer, scheduler, scaler, sampler and RNG
  states: resuming gives exactly the uninterrupted run. A checkpoint is
  written beside its place and renamed into it, so a crash never leaves a
  half-written one.
- Ctrl-C (SIGINT) or SIGTERM (a preempted job) finishes the current step,
  saves a checkpoint (before any evaluation) and raises ``TrainingInterrupted``;
  a second Ctrl-C stops at once. Under DDP the processes agree on the step to
  stop at and wait for the save.
- tqdm progress, and JSON lines in ``output_dir/log.jsonl``; every evaluation is
  reported as measured (never a max over evaluations).
- Safety: checkpoints load with ``torch.load(weights_only=True)`` (a checkpoint
  cannot run code); a non-finite loss or gradient norm raises
  ``NonFiniteLossError`` naming the step and the tasks (or, with
  ``skip_nonfinite_steps``, skips the step and counts it), and nothing
  non-finite is ever saved; the final checkpoint is written before the final
  evaluation; a failed save leaves the previous checkpoint and no partial one;
  one run at a time per output_dir (``output_dir/.camtl.lock``); only the
  newest ``save_total_limit`` checkpoints are kept. An evaluation set without
  examples is left out of evaluation, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from transformers import set_seed

from camtl.data.dataset import token_budget_bounds
from camtl.training.samplers import SAMPLING, MultiTaskBatchSampler, mt_uncertainty_select

# Parameters of conditional modules: trainable even inside frozen layers (the published list
# names 'film.gb_weights', which matches nothing; these match what the paper meant).
CONDITIONAL_MARKERS = ("random_weight_matrix", "cond_block_diag_attn", "ln_weight_modulation", "adapter")


LOCK_NAME = ".camtl.lock"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


class NonFiniteLossError(ValueError):
    """A step's loss or gradient norm (or the weights) is not finite; ``step`` and ``tasks`` say where."""

    def __init__(self, message: str, step: int, tasks: Sequence[str] = ()):
        super().__init__(message)
        self.step, self.tasks = step, list(tasks)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unsafe, malformed, or already at the end of this run."""


class OutputDirInUseError(RuntimeError):
    """Another training run holds the output folder's lock."""


@dataclass
class TrainingArguments:
    """The run's settings; ``__post_init__`` checks each (ValueError naming it and its allowed range)."""

    output_dir: str = "camtl-output"
    learning_rate: float = 2e-5
    num_train_epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    # A token budget per batch (None: batches of a fixed number of examples); see Trainer.
    max_tokens_per_batch: Optional[int] = None
    gradient_accumulation_steps: int = 1
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    sampling: str = "proportional"  # proportional | uniform | mt_uncertainty
    mt_uncertainty_published: bool = False  # the published variant: task-mean factor, STS-B copies MRPC, dropout on
    freeze_encoder_layers: Optional[str] = None  # "a-b"
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate at the end of each epoch
    save_steps: int = 0  # 0: save at the end of each epoch
    save_total_limit: int = 2  # checkpoints kept in output_dir (the oldest are deleted)
    skip_nonfinite_steps: bool = False  # skip (and count) a step with a non-finite loss instead of raising
    progress: bool = True

    def __post_init__(self):
        def require(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"TrainingArguments: {name} must be {allowed}, got {getattr(self, name)!r}")

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            require(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low,
                    name, f"an integer >= {low}")

        def real(name: str, ok: Callable[[float], bool], allowed: str) -> None:
            value = getattr(self, name)
            is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            require(is_real and math.isfinite(value) and ok(value), name, allowed)

        require(isinstance(self.output_dir, (str, os.PathLike)) and str(self.output_dir) != "", "output_dir",
                "a folder path")
        real("learning_rate", lambda v: v > 0, "a finite number > 0")
        integer("max_steps", 0)
        if self.max_steps == 0:
            real("num_train_epochs", lambda v: v > 0, "a finite number > 0 (when max_steps is 0)")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_total_limit"):
            integer(name, 1)
        for name in ("eval_steps", "save_steps", "seed"):
            integer(name, 0)
        if self.max_tokens_per_batch is not None:
            integer("max_tokens_per_batch", 1)
        real("warmup_proportion", lambda v: 0 <= v <= 1, "in [0, 1]")
        real("weight_decay", lambda v: v >= 0, "a finite number >= 0")
        real("adam_epsilon", lambda v: v >= 0, "a finite number >= 0")
        real("max_grad_norm", lambda v: v >= 0, "a finite number >= 0 (0: no clipping)")
        require(self.sampling in SAMPLING, "sampling", f"one of {', '.join(SAMPLING)}")
        if self.bf16 and self.fp16:
            raise ValueError("TrainingArguments: choose at most one of bf16 and fp16, got both")
        if self.freeze_encoder_layers:
            _layer_range(self.freeze_encoder_layers)


def _layer_range(spec: str) -> tuple:
    """(a, b) from "a-b" with 0 <= a <= b; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec) if isinstance(spec, str) else None
    if not m or int(m.group(1)) > int(m.group(2)):
        raise ValueError(f"freeze_encoder_layers must be 'a-b' (encoder layers a to b) with 0 <= a <= b, "
                         f"got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def freeze_encoder_layers(model, spec: Optional[str]) -> List[str]:
    """Freezes encoder layers a..b (inclusive) and the embeddings, as published, but keeps every
    conditional module trainable. Returns the names of the frozen parameters."""
    if not spec:
        return []
    lo, hi = _layer_range(spec)
    layer_of = {name: re.match(r"encoder\.layer\.(\d+)\.", name) for name, _ in model.bert.named_parameters()}
    num_layers = 1 + max((int(m.group(1)) for m in layer_of.values() if m), default=-1)
    if hi >= num_layers:
        raise ValueError(f"freeze_encoder_layers {spec!r}: the model has {num_layers} encoder layers "
                         f"(0-{num_layers - 1})")
    frozen = []
    for name, p in model.bert.named_parameters():
        layer = layer_of[name]
        freeze = (layer is not None and lo <= int(layer.group(1)) <= hi
                  and not any(marker in name for marker in CONDITIONAL_MARKERS))
        freeze = freeze or name.startswith("embeddings.")
        p.requires_grad_(not freeze)
        if freeze:
            frozen.append("bert." + name)
    return frozen


def _item_lengths(dataset) -> np.ndarray:
    """Every item's token count: ``dataset.lengths()`` where it has one (MultiTaskDataset), else counted."""
    if hasattr(dataset, "lengths"):
        return np.asarray(dataset.lengths(), dtype=np.int64)
    return np.array([len(dataset[i]["input_ids"]) for i in range(len(dataset))], dtype=np.int64)


def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains a CaMtl model on a multi-task dataset.

    Args:
        model: a ``camtl.models.CaMtl``.
        args: ``TrainingArguments``.
        train_dataset: items are dicts with input_ids, token_type_ids, attention_mask, label, task_id;
            ``task_indices`` lists each task's item indices.
        collate: turns a list of items into a batch of tensors (input_ids, attention_mask,
            token_type_ids, labels, task_id), e.g. ``camtl.data.DynamicPaddingCollator``; or a packed
            batch (``camtl.data.PackingCollator``: no attention_mask, position_ids, cu_seqlens, max_seqlen),
            whose task_id, labels and the model's per-sequence outputs are [S], one per example.
        eval_datasets: name -> (task index, dataset) for evaluation.
        compute_metrics: (task index, predictions, labels) -> dict of metrics.
        task_names: the tasks' names (for logs and the published STS-B/MRPC quirk).
        save_extra: called with a checkpoint's folder before it is renamed into place, to add files of
            the caller's (the CLI adds the tokenizer and tasks.json); rank 0 only.

    With ``args.max_tokens_per_batch`` = N, every batch holds at most N real tokens (padding not counted)
    and at most the batch size in examples, whichever limit comes first:

    - training (proportional, uniform): a batch closes before the example that would take it past N tokens;
      that example opens the next batch (see ``MultiTaskBatchSampler``). The loss is the published one of
      that batch. Under DDP the global batch holds up to N × processes tokens, each process a slice of it;
    - MT-Uncertainty: the candidates (batch size per task, as without a budget) are scored in forwards of
      at most N tokens each; the batch is the longest run of the candidates, by decreasing score, that
      holds at most N × processes tokens and the global batch size in examples;
    - evaluation and prediction: consecutive examples up to N tokens (and the evaluation batch size).

    The budget counts real tokens with and without packing, so packed and padded runs see the same batches.
    N must be at least the longest example (ValueError otherwise): no example is dropped or cut.
    """

    def __init__(self, model, args: TrainingArguments, train_dataset, collate: Callable,
                 eval_datasets: Optional[Dict[str, tuple]] = None, compute_metrics: Optional[Callable] = None,
                 task_names: Optional[Sequence[str]] = None, save_extra: Optional[Callable[[str], None]] = None):
        args.__post_init__()  # fields may have been changed since it was built
        self.args = args
        self.rank, self.world = _world()
        self.device = next(model.parameters()).device
        self.model = model
        self.frozen = freeze_encoder_layers(model, args.freeze_encoder_layers)
        self.ddp_model = model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_dataset = train_dataset
        self.collate = collate
        self.eval_datasets = {}
        for name, (task, dataset) in (eval_datasets or {}).items():
            if len(dataset) == 0:  # e.g. a dev file with only its header: no metric to measure
                if self.rank == 0:
                    warnings.warn(f"camtl: the evaluation set {name!r} has no example; it is left out of "
                                  "every evaluation", stacklevel=2)
                continue
            self.eval_datasets[name] = (task, dataset)
        self.compute_metrics = compute_metrics
        self.task_names = list(task_names or [])
        self.save_extra = save_extra
        global_batch = args.per_device_train_batch_size * self.world
        budget = args.max_tokens_per_batch
        self.sampler = MultiTaskBatchSampler(
            train_dataset.task_indices, global_batch, args.sampling, seed=args.seed,
            max_tokens_per_batch=None if budget is None else budget * self.world,
            lengths=None if budget is None else _item_lengths(train_dataset))
        steps_per_epoch = math.ceil(len(self.sampler) / args.gradient_accumulation_steps)
        self.total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * steps_per_epoch))
        self.optimizer = self._optimizer()
        total, warmup = self.total_steps, int(args.warmup_proportion * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup
            else max(0.0, (total - s) / max(1, total - warmup)))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.fp16)
        self.global_step = 0
        self.skipped_nonfinite_steps = 0
        self.log_path = os.path.join(args.output_dir, "log.jsonl")

    # ---- set-up ------------------------------------------------------------------------------------------------
    def _optimizer(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue  # frozen: no optimizer state
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.args.learning_rate, eps=self.args.adam_epsilon)

    def _autocast(self):
        if self.args.bf16 or self.args.fp16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.args.bf16 else torch.float16)
        return contextlib.nullcontext()

    def _to_device(self, batch: Dict) -> Dict:
        # A packed batch's max_seqlen is a plain int (the models take it as one).
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- one step ----------------------------------------------------------------------------------------------
    def _batches(self, dataset, indices: Sequence[int], batch_size: int):
        """Consecutive runs of ``indices`` that make one forward each: batch_size items, or with a token
        budget, items up to max_tokens_per_batch tokens (and batch_size); yields the collated batches."""
        items = [dataset[i] for i in indices]
        if self.args.max_tokens_per_batch is None:
            bounds = list(range(0, len(items), batch_size)) + [len(items)] if items else [0]
        else:
            bounds = token_budget_bounds([len(it["input_ids"]) for it in items], self.args.max_tokens_per_batch,
                                         batch_size)
        for a, b in zip(bounds[:-1], bounds[1:]):
            yield self._to_device(self.collate(items[a:b]))

    def _select(self, indices: List[int]) -> List[int]:
        """MT-Uncertainty: score the candidates and keep the top global batch.

        With a token budget, the candidates are scored in forwards of at most max_tokens_per_batch tokens
        (each candidate's score does not depend on the others), and the batch is the longest run of them, by
        decreasing score, within the sampler's budget."""
        was_training = self.model.training
        self.model.train(self.args.mt_uncertainty_published)  # scoring runs in eval mode unless published
        entropy, task_id = [], []
        with torch.no_grad(), self._autocast():
            for batch in self._batches(self.train_dataset, indices, len(indices)):
                entropy.append(self.model(**{k: v for k, v in batch.items() if k != "labels"}).entropy)
                task_id.append(batch["task_id"])
        self.model.train(was_training)
        scored = {"entropy": torch.cat(entropy), "task_id": torch.cat(task_id)}
        k = self.sampler.batch_size if self.sampler.max_tokens_per_batch is None else len(indices)
        keep = mt_uncertainty_select(scored["entropy"], scored["task_id"], k,
                                     self.args.mt_uncertainty_published, self.task_names).tolist()
        if self.sampler.max_tokens_per_batch is not None:
            lengths = self.sampler.lengths[[indices[i] for i in keep]]
            fits = int(np.searchsorted(np.cumsum(lengths), self.sampler.max_tokens_per_batch, side="right"))
            keep = keep[:min(fits, self.sampler.batch_size)]  # fits >= 1: the budget holds any example
        return [indices[i] for i in keep]

    def _micro_step(self, indices: List[int], scale: float) -> Dict[str, float]:
        """Forward and backward of this process's slice of a global batch; returns its log values."""
        mine = indices[self.rank::self.world]
        batch = self._to_device(self.collate([self.train_dataset[i] for i in mine]))
        with self._autocast():
            out = self.ddp_model(**batch)
        T = len(self.model.task_num_labels)
        count = out.task_count.detach().to(torch.float64)
        if self.world > 1:
            dist.all_reduce(count)  # the global count of each task's examples
        present = count > 0
        # The global published loss, split so that DDP's gradient average (÷ world) gives its gradient.
        loss = (out.task_loss_sum / count.clamp_min(1).to(out.task_loss_sum.dtype))[present].sum()
        loss = loss / present.sum() * self.world
        self.scaler.scale(loss * scale).backward()
        task_loss = (out.task_loss_sum.detach().double() / count.clamp_min(1))
        if self.world > 1:
            dist.all_reduce(task_loss)
        if not bool(torch.isfinite(task_loss[present]).all()):  # the same on every process
            self._nonfinite_tasks |= self._tasks_with_nonfinite_examples(out.logits.detach(), batch, task_loss,
                                                                         present)
        return {"loss": float(task_loss[present].mean()),
                **{f"loss/{self._task_name(t)}": float(task_loss[t]) for t in range(T) if present[t]}}

    def _tasks_with_nonfinite_examples(self, logits, batch, task_loss, present) -> set:
        """The tasks having an example with a non-finite logit (of its classes) or label, on any process.

        An example's non-finite logit or label names its task directly. When no example shows it (an
        overflow inside the loss), every task whose loss is not finite.
        """
        T = len(self.model.task_num_labels)
        task_id = batch["task_id"]
        num_classes = torch.tensor(self.model.task_num_labels, device=logits.device)[task_id]
        valid = torch.arange(logits.shape[1], device=logits.device)[None, :] < num_classes[:, None]
        bad_row = ~(torch.isfinite(logits) | ~valid).all(-1) | ~torch.isfinite(batch["labels"].to(logits.device))
        flags = torch.zeros(T, dtype=torch.float64, device=logits.device)
        flags[task_id[bad_row]] = 1.0
        if self.world > 1:
            flags = flags.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        tasks = {t for t in range(T) if flags[t] > 0}
        return tasks or {t for t in range(T) if present[t] and not math.isfinite(float(task_loss[t]))}

    def _task_name(self, t: int) -> str:
        return self.task_names[t] if t < len(self.task_names) else str(t)

    def train_step(self) -> Dict[str, float]:
        self.model.train()
        self._nonfinite_tasks: set = set()
        logs: Dict[str, float] = {}
        acc = self.args.gradient_accumulation_steps
        for _ in range(acc):
            indices = self.sampler.next_batch()
            if self.args.sampling == "mt_uncertainty":
                indices = self._select(indices)
            for k, v in self._micro_step(indices, 1.0 / acc).items():
                logs[k] = logs.get(k, 0.0) + v / acc
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm or math.inf  # inf: clip_grad_norm_ only measures
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        # Every process sees the same global task losses and (all-reduced) gradient norm, so all decide alike.
        problem = self._nonfinite(logs)
        if problem is None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # fp16: the non-finite gradients count as an overflow (a lower scale)
            message, tasks = problem
            if not self.args.skip_nonfinite_steps:
                raise NonFiniteLossError(message + "; no update was made and nothing was saved. Check the data "
                                         "(labels) and learning_rate, or set skip_nonfinite_steps to skip such "
                                         "steps", self.global_step + 1, tasks)
            self.skipped_nonfinite_steps += 1
            if self.rank == 0:
                warnings.warn(f"camtl: {message}; step skipped (no update)", stacklevel=2)
            with warnings.catch_warnings():  # a skipped first step has no optimizer.step(): expected
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()  # the schedule follows the steps, taken or skipped (as resume needs)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        logs["lr"] = self.scheduler.get_last_lr()[0]
        if self.args.skip_nonfinite_steps:
            logs["skipped_nonfinite_steps"] = self.skipped_nonfinite_steps
        return logs

    def _nonfinite(self, logs: Dict[str, float]) -> Optional[tuple]:
        """(message, task names) when this step's loss or gradient norm is not finite, else None.

        Under fp16 a non-finite gradient with a finite loss is an overflow that the gradient scaler
        handles itself (it skips the update and lowers its scale), so only the loss counts there.
        """
        step = self.global_step + 1
        tasks = [self._task_name(t) for t in sorted(self._nonfinite_tasks)]
        if tasks:
            values = ", ".join(f"{name} ({logs.get('loss/' + name)})" for name in tasks)
            return f"step {step}: the loss of task{'s' if len(tasks) > 1 else ''} {values} is not finite", tasks
        if not math.isfinite(logs["loss"]):
            return f"step {step}: the loss ({logs['loss']}) is not finite", []
        if not math.isfinite(logs["grad_norm"]) and not self.args.fp16:
            return f"step {step}: the gradient norm ({logs['grad_norm']}) is not finite", []
        return None

    # ---- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, dataset) -> tuple:
        """(predictions, labels or None) over a dataset, in order: class ids, or scores for a regression task."""
        self.model.eval()
        preds, labels = [], []
        for batch in self._batches(dataset, range(len(dataset)), self.args.per_device_eval_batch_size):
            with self._autocast():
                out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
            regression = torch.tensor(self.model.task_num_labels, device=self.device)[batch["task_id"]] == 1
            pred = torch.where(regression, out.logits[:, 0].float(), out.logits.argmax(-1).float())
            preds.append(pred.cpu())
            if "labels" in batch:  # test splits have none
                labels.append(batch["labels"].cpu())
        if not preds:  # an empty dataset
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        return torch.cat(preds).numpy(), (torch.cat(labels).numpy() if labels else None)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Metrics of every evaluation set, as measured now."""
        results = {}
        for name, (task, dataset) in self.eval_datasets.items():
            preds, labels = self.predict(dataset)
            results[name] = self.compute_metrics(task, preds, labels) if self.compute_metrics else {}
        return results

    # ---- the loop, checkpoints ----------------------------------------------------------------------------------
    def _log(self, record: Dict) -> None:
        if self.rank == 0:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, resume_from: Optional[str] = None) -> Dict:
        """Trains for total_steps; returns the last evaluation (empty without evaluation sets).

        Raises TrainingInterrupted after SIGINT or SIGTERM, once the step under way is done and saved.
        """
        with self._output_dir_lock():
            if resume_from:
                self.load_checkpoint(resume_from)
                if self.global_step >= self.total_steps:
                    raise CheckpointError(
                        f"{resume_from} is at step {self.global_step}, not before the end of this run "
                        f"({self.total_steps} steps): nothing to resume. Raise max_steps or num_train_epochs, "
                        "or start without resuming")
            else:
                set_seed(self.args.seed)
            return self._train_loop()

    def _train_loop(self) -> Dict:
        """Steps from global_step to total_steps; returns the last evaluation."""
        steps_per_epoch = max(1, math.ceil(len(self.sampler) / self.args.gradient_accumulation_steps))
        eval_every = self.args.eval_steps or steps_per_epoch
        save_every = self.args.save_steps or steps_per_epoch
        bar = None
        if self.args.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step")
        last_eval: Dict = {}
        started = time.time()
        with _deferred_stop_signals() as stop:
            try:
                while self.global_step < self.total_steps:
                    evaluation = self._train_one(steps_per_epoch, eval_every, save_every, started, bar, stop)
                    if evaluation is not None:
                        last_eval = evaluation
            finally:
                if bar is not None:
                    bar.close()
        return last_eval

    def _train_one(self, steps_per_epoch, eval_every, save_every, started, bar, stop: threading.Event):
        """One step with its logging, evaluation and checkpoint; returns the evaluation, if one ran.

        When a stop was asked for (by any process), the evaluation is skipped: a preempted job has
        seconds, and the checkpoint comes first. Then it raises TrainingInterrupted.
        """
        logs = self.train_step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        last = self.global_step == self.total_steps
        stopping = not last and self._agree_to_stop(stop.is_set())
        if self.global_step % self.args.logging_steps == 0 or last or stopping:
            self._log({"step": self.global_step, "epoch": self.global_step / steps_per_epoch,
                       "elapsed_s": round(time.time() - started, 2), **logs})
        # The checkpoint first: an evaluation that fails (or a preempted job's last seconds) cannot lose it.
        if self.global_step % save_every == 0 or last or stopping:
            self.save_checkpoint(self.checkpoint_path())
        evaluation = None
        if self.eval_datasets and (self.global_step % eval_every == 0 or last) and not stopping:
            evaluation = self.evaluate()
            self._log({"step": self.global_step, "eval": evaluation})
        if stopping:
            if self.world > 1:
                dist.barrier()  # no process exits (and gets its launcher to kill the others) before the save
            self._log({"step": self.global_step, "interrupted": True, "checkpoint": self.checkpoint_path()})
            raise TrainingInterrupted(self.global_step, self.checkpoint_path())
        return evaluation

    def checkpoint_path(self) -> str:
        return os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")

    def _agree_to_stop(self, mine: bool) -> bool:
        """Whether any process was asked to stop: under DDP all stop after the same step."""
        if self.world == 1:
            return mine
        flag = torch.tensor([float(mine)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_checkpoint(self, path: str) -> None:
        """Writes the checkpoint into path.partial, then renames it to path (replacing an older one).

        Non-finite weights are never saved (NonFiniteLossError). A failed write raises OSError naming
        path and leaves the previous checkpoint as it was, without a partial one. In output_dir, only
        the newest save_total_limit checkpoints are kept.
        """
        path = path.rstrip(os.sep)
        # On every process (their weights are the same), so that all stop alike; one sync for all weights.
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise NonFiniteLossError(f"step {self.global_step}: the weights {', '.join(bad[:5])}"
                                     f"{' ...' if len(bad) > 5 else ''} are not finite; the checkpoint {path} "
                                     "was not written", self.global_step)
        if self.rank != 0:
            return
        partial, old = path + ".partial", path + ".old"
        if os.path.isdir(old) and not os.path.exists(path):  # a crash between the two renames below
            os.replace(old, path)
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            os.makedirs(partial)
            self.model.save_pretrained(partial)
            torch.save(self._trainer_state(), os.path.join(partial, "trainer_state.pt"))
            if self.save_extra is not None:
                self.save_extra(partial)
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            # torch.save reports a full disk as a RuntimeError ("enforce fail at inline_container.cc").
            if isinstance(exc, (OSError, RuntimeError)):
                raise OSError(getattr(exc, "errno", None), f"writing the checkpoint {path} failed "
                              f"({getattr(exc, 'strerror', None) or exc}); the previous checkpoint is left "
                              "as it was") from exc
            raise
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)
        self._delete_old_checkpoints(path)

    def _trainer_state(self) -> Dict:
        # Only tensors and plain data: the file loads with weights_only=True.
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
                "global_step": self.global_step, "skipped_nonfinite_steps": self.skipped_nonfinite_steps,
                "args": {k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                         for k, v in asdict(self.args).items()},
                "rng": _rng_state()}

    def _delete_old_checkpoints(self, kept: str) -> None:
        """Deletes output_dir's oldest checkpoint-N folders beyond save_total_limit, never ``kept``."""
        folder = os.path.dirname(kept) or "."
        if not (os.path.isdir(self.args.output_dir) and os.path.samefile(folder, self.args.output_dir)):
            return  # a checkpoint saved elsewhere by hand: leave that folder alone
        others = []
        for name in os.listdir(folder):
            m = CHECKPOINT_RE.fullmatch(name)
            full = os.path.join(folder, name)
            if m and os.path.isdir(full) and name != os.path.basename(kept):
                others.append((int(m.group(1)), full))
        others.sort()
        for _, full in others[: max(0, len(others) + 1 - self.args.save_total_limit)]:
            shutil.rmtree(full, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restores a checkpoint written by save_checkpoint; CheckpointError (naming the file) if it is not one.

        The trainer state loads with weights_only=True: a file holding anything but tensors and plain
        data (which could run code when unpickled) is refused.
        """
        from safetensors.torch import load_file

        state_file, model_file = os.path.join(path, "trainer_state.pt"), os.path.join(path, "model.safetensors")
        for file in (state_file, model_file):
            if not os.path.isfile(file):
                raise CheckpointError(f"{path} is not a camtl checkpoint: {file} is missing")
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()[-1][:300]
            raise CheckpointError(f"refusing to load {state_file}: it holds objects other than tensors and plain "
                                  "data, which could run code when loaded (a tampered file, or one not written "
                                  f"by this camtl). Unpickler: {reason}") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"{state_file} cannot be read ({type(exc).__name__}: {exc})") from exc
        _check_trainer_state(state, state_file)
        try:
            self.model.load_state_dict(load_file(model_file), strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            _set_rng_state(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}: {exc})") from exc
        self.global_step = state["global_step"]
        self.skipped_nonfinite_steps = state.get("skipped_nonfinite_steps", 0)

    @contextlib.contextmanager
    def _output_dir_lock(self):
        """Holds output_dir/.camtl.lock (rank 0 only) while inside; OutputDirInUseError when another run has it.

        An flock: the kernel drops it when its process dies, so a crashed run's lock file blocks nothing.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            fcntl = None
        if self.rank != 0 or fcntl is None:
            yield
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        lock_path = os.path.join(self.args.output_dir, LOCK_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise OutputDirInUseError(
                    f"{os.path.abspath(self.args.output_dir)} is in use by another camtl training run (PID "
                    f"{holder}, holding {lock_path}); wait for it to end or choose another output_dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock


def _check_trainer_state(state, state_file: str) -> None:
    """CheckpointError naming the file when the loaded trainer state lacks a part or has a bad global_step."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} is not a camtl trainer state (a {type(state).__name__}, not a dict)")
    for key in ("optimizer", "scheduler", "scaler", "sampler", "rng"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{state_file}: the trainer state lacks its {key!r} state")
    for key in ("global_step", "skipped_nonfinite_steps"):
        value = state.get(key, 0 if key == "skipped_nonfinite_steps" else None)  # the count came later
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{state_file}: {key} must be an integer >= 0, got {value!r}")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a whole step; ``checkpoint`` resumes it exactly."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"training interrupted after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@contextlib.contextmanager
def _deferred_stop_signals():
    """While inside, SIGINT and SIGTERM only set the yielded request; a second SIGINT (Ctrl-C) acts at once.

    A repeated SIGTERM is not an order to hurry: launchers (torchrun, SLURM) send it to every process,
    some more than once. Signals the process ignores (nohup), or whose handler was set outside Python,
    are left alone; so are all signals off the main thread (only it can set handlers).
    """
    request = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    # A handler installed outside Python (getsignal gives None) cannot be restored: leave that signal alone.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler not in (None, signal.SIG_IGN)}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def handler(signum, frame):
        if request.is_set():
            if signum == signal.SIGINT:  # Ctrl-C again: the previous handlers, now
                restore()
                signal.raise_signal(signum)
            return
        request.set()
        print(f"\ncamtl: {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to stop now)", file=sys.stderr, flush=True)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield request
    finally:
        restore()


def _rng_state() -> Dict:
    """Every RNG's state as tensors, lists and numbers (what torch.load(weights_only=True) accepts)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
