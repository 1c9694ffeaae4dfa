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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from transformers import set_seed

from camtl.training.samplers import MultiTaskBatchSampler, mt_uncertainty_select

# Parameters of conditional modules: trainable even inside frozen layers (the published list
# names 'film.gb_weights', which matches nothing; these match what the paper meant).
CONDITIONAL_MARKERS = ("random_weight_matrix", "cond_block_diag_attn", "ln_weight_modulation", "adapter")


@dataclass
class TrainingArguments:
    output_dir: str = "camtl-output"
    learning_rate: float = 2e-5
    num_train_epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    sampling: str = "proportional"  # proportional | uniform | mt_uncertainty
    mt_uncertainty_published: bool = False  # the published variant: task-mean factor, STS-B copies MRPC, dropout on
    freeze_encoder_layers: Optional[str] = None  # "a-b"
    logging_steps: int = 10
    eval_steps: int = 0  # 0: evaluate at the end of each epoch
    save_steps: int = 0  # 0: save at the end of each epoch
    progress: bool = True


def freeze_encoder_layers(model, spec: Optional[str]) -> List[str]:
    """Freezes encoder layers a..b (inclusive) and the embeddings, as published, but keeps every
    conditional module trainable. Returns the names of the frozen parameters."""
    if not spec:
        return []
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise ValueError(f"freeze_encoder_layers must be 'a-b' with a <= b, got {spec!r}")
    lo, hi = int(m.group(1)), int(m.group(2))
    frozen = []
    for name, p in model.bert.named_parameters():
        layer = re.match(r"encoder\.layer\.(\d+)\.", name)
        freeze = (layer is not None and lo <= int(layer.group(1)) <= hi
                  and not any(marker in name for marker in CONDITIONAL_MARKERS))
        freeze = freeze or name.startswith("embeddings.")
        p.requires_grad_(not freeze)
        if freeze:
            frozen.append("bert." + name)
    return frozen


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
            token_type_ids, labels, task_id).
        eval_datasets: name -> (task index, dataset) for evaluation.
        compute_metrics: (task index, predictions, labels) -> dict of metrics.
        task_names: the tasks' names (for logs and the published STS-B/MRPC quirk).
    """

    def __init__(self, model, args: TrainingArguments, train_dataset, collate: Callable,
                 eval_datasets: Optional[Dict[str, tuple]] = None, compute_metrics: Optional[Callable] = None,
                 task_names: Optional[Sequence[str]] = None):
        if args.bf16 and args.fp16:
            raise ValueError("choose at most one of bf16 and fp16")
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
        self.eval_datasets = eval_datasets or {}
        self.compute_metrics = compute_metrics
        self.task_names = list(task_names or [])
        global_batch = args.per_device_train_batch_size * self.world
        self.sampler = MultiTaskBatchSampler(train_dataset.task_indices, global_batch, args.sampling, seed=args.seed)
        steps_per_epoch = math.ceil(len(self.sampler) / args.gradient_accumulation_steps)
        self.total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * steps_per_epoch))
        self.optimizer = self._optimizer()
        total, warmup = self.total_steps, int(args.warmup_proportion * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup
            else max(0.0, (total - s) / max(1, total - warmup)))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.fp16)
        self.global_step = 0
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

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- one step ----------------------------------------------------------------------------------------------
    def _select(self, indices: List[int]) -> List[int]:
        """MT-Uncertainty: score the candidates and keep the top global batch."""
        batch = self._to_device(self.collate([self.train_dataset[i] for i in indices]))
        was_training = self.model.training
        self.model.train(self.args.mt_uncertainty_published)  # scoring runs in eval mode unless published
        with torch.no_grad(), self._autocast():
            out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
        self.model.train(was_training)
        keep = mt_uncertainty_select(out.entropy, batch["task_id"], self.sampler.batch_size,
                                     self.args.mt_uncertainty_published, self.task_names)
        return [indices[i] for i in keep.tolist()]

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
        return {"loss": float(task_loss[present].mean()),
                **{f"loss/{self._task_name(t)}": float(task_loss[t]) for t in range(T) if present[t]}}

    def _task_name(self, t: int) -> str:
        return self.task_names[t] if t < len(self.task_names) else str(t)

    def train_step(self) -> Dict[str, float]:
        self.model.train()
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
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return logs

    # ---- evaluation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, dataset) -> tuple:
        """(predictions, labels or None) over a dataset, in order: class ids, or scores for a regression task."""
        self.model.eval()
        preds, labels = [], []
        bs = self.args.per_device_eval_batch_size
        for start in range(0, len(dataset), bs):
            batch = self._to_device(self.collate([dataset[i] for i in range(start, min(start + bs, len(dataset)))]))
            with self._autocast():
                out = self.model(**{k: v for k, v in batch.items() if k != "labels"})
            regression = torch.tensor(self.model.task_num_labels, device=self.device)[batch["task_id"]] == 1
            pred = torch.where(regression, out.logits[:, 0].float(), out.logits.argmax(-1).float())
            preds.append(pred.cpu())
            if "labels" in batch:  # test splits have none
                labels.append(batch["labels"].cpu())
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
        if resume_from:
            self.load_checkpoint(resume_from)
        else:
            set_seed(self.args.seed)
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
        evaluation = None
        if self.eval_datasets and (self.global_step % eval_every == 0 or last) and not stopping:
            evaluation = self.evaluate()
            self._log({"step": self.global_step, "eval": evaluation})
        if self.global_step % save_every == 0 or last or stopping:
            self.save_checkpoint(self.checkpoint_path())
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
        """Writes the checkpoint into path.partial, then renames it to path (replacing an older one)."""
        if self.rank != 0:
            return
        partial, old = path.rstrip(os.sep) + ".partial", path.rstrip(os.sep) + ".old"
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(partial)
        self.model.save_pretrained(partial)
        torch.save({
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
            "global_step": self.global_step, "args": asdict(self.args), "rng": _rng_state(),
        }, os.path.join(partial, "trainer_state.pt"))
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = state["global_step"]
        _set_rng_state(state["rng"])


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
