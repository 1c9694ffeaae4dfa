"""Multi-task batch samplers and MT-Uncertainty selection.

Every sampler yields lists of dataset indices (one list per global batch) from
``task_indices`` (task t's example indices) and is a deterministic function of
its seed and its state, which ``state_dict``/``load_state_dict`` save and
restore exactly (for resume).

- ``proportional``: all examples shuffled each epoch and cut into batches, so
  tasks appear in proportion to their sizes and mix within a batch;
- ``uniform``: each example of a batch comes from a task drawn uniformly;
- ``mt_uncertainty``: each step draws ``batch_size`` candidates from every
  task; the trainer scores them and keeps the top ``batch_size`` (see
  ``mt_uncertainty_select``).

Within a task, examples are drawn without replacement from a per-task
permutation that is redrawn when exhausted (a cycle).

With a token budget (``max_tokens_per_batch``, and the examples' ``lengths``),
a batch closes before the example that would take it past the budget, or at
``batch_size`` examples, whichever comes first. That example is not dropped:
it opens the next batch (``proportional`` reads one permutation after another
as a stream; ``uniform`` leaves it first in its task's cycle). The budget must
hold the longest example, so every example fits a batch. ``mt_uncertainty``
draws its candidates as without a budget; the trainer keeps the top-scored
ones that fit.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

SAMPLING = ("proportional", "uniform", "mt_uncertainty")


class _TaskCycles:
    """Per-task cursors over per-task permutations: draw(t, n) gives n indices of task t, cycling."""

    def __init__(self, task_indices: Sequence[Sequence[int]], seed: int):
        self.task_indices = [np.asarray(ix, dtype=np.int64) for ix in task_indices]
        for t, ix in enumerate(self.task_indices):
            if len(ix) == 0:
                raise ValueError(f"task {t} has no training example")
        self.seed = seed
        self.cycle = [0] * len(self.task_indices)
        self.pos = [0] * len(self.task_indices)
        self._perms: Dict[tuple, np.ndarray] = {}

    def _perm(self, t: int) -> np.ndarray:
        key = (t, self.cycle[t])
        if key not in self._perms:  # one permutation per task and cycle, kept while it is read
            rng = np.random.default_rng([self.seed, 1, t, self.cycle[t]])
            self._perms = {k: v for k, v in self._perms.items() if k[0] != t}
            self._perms[key] = self.task_indices[t][rng.permutation(len(self.task_indices[t]))]
        return self._perms[key]

    def peek(self, t: int) -> int:
        """The index draw(t, 1) would give, without drawing it."""
        return int(self._perm(t)[self.pos[t]])

    def draw(self, t: int, n: int) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            perm = self._perm(t)
            take = perm[self.pos[t]: self.pos[t] + n - len(out)]
            out.extend(int(i) for i in take)
            self.pos[t] += len(take)
            if self.pos[t] == len(perm):
                self.cycle[t] += 1
                self.pos[t] = 0
        return out

    def state_dict(self) -> Dict:
        return {"cycle": list(self.cycle), "pos": list(self.pos)}

    def load_state_dict(self, state: Dict) -> None:
        self.cycle, self.pos = list(state["cycle"]), list(state["pos"])


class MultiTaskBatchSampler:
    """Yields global batches of dataset indices; ``steps_per_epoch`` batches make an epoch.

    Args:
        task_indices: task t's dataset indices.
        batch_size: the global batch size (all processes together).
        sampling: "proportional", "uniform" or "mt_uncertainty" (then each batch
            holds batch_size candidates per task, to be scored and cut to batch_size).
        seed: the sampler's seed.
        steps_per_epoch: batches per epoch; default: the examples over batch_size
            (for mt_uncertainty: the largest task's size × tasks over batch_size, as published);
            with a token budget, over the examples an average batch holds (about one pass).
        max_tokens_per_batch: the token budget of a batch (None: batch_size examples); needs ``lengths``.
        lengths: ``lengths[i]``, the token count of dataset index i.
    """

    def __init__(self, task_indices: Sequence[Sequence[int]], batch_size: int, sampling: str = "proportional",
                 seed: int = 0, steps_per_epoch: Optional[int] = None, max_tokens_per_batch: Optional[int] = None,
                 lengths: Optional[Sequence[int]] = None):
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task_indices = [list(ix) for ix in task_indices]
        self.batch_size = batch_size
        self.sampling = sampling
        self.seed = seed
        self.cycles = _TaskCycles(self.task_indices, seed)
        self.all_indices = np.concatenate([np.asarray(ix, dtype=np.int64) for ix in self.task_indices])
        self.max_tokens_per_batch = max_tokens_per_batch
        self.lengths = None
        per_batch = batch_size  # examples in an average batch
        if max_tokens_per_batch is not None:
            self.lengths = self._check_budget(max_tokens_per_batch, lengths)
            mean_length = float(self.lengths[self.all_indices].mean())
            per_batch = max(1, min(batch_size, int(max_tokens_per_batch / mean_length)))
        total = sum(len(ix) for ix in self.task_indices)
        if steps_per_epoch is None:
            if sampling == "mt_uncertainty":
                steps_per_epoch = max(len(ix) for ix in self.task_indices) * len(self.task_indices) // per_batch
            else:
                steps_per_epoch = total // per_batch
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step = 0  # batches yielded so far, over all epochs
        self.stream = [0, 0]  # with a budget, proportional: (epoch, position in its permutation) of the next example
        self._stream_perm = (-1, None)  # (epoch, its permutation), cached

    def _check_budget(self, budget, lengths) -> np.ndarray:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"max_tokens_per_batch must be an int >= 1 or None, got {budget!r}")
        if lengths is None:
            raise ValueError("max_tokens_per_batch needs the examples' lengths (lengths[i]: index i's tokens)")
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or len(lengths) <= int(self.all_indices.max()):
            raise ValueError(f"lengths must be a list with an entry for every dataset index (up to "
                             f"{int(self.all_indices.max())}), got shape {lengths.shape}")
        longest = int(lengths[self.all_indices].max())
        if longest > budget:  # that example would fit no batch
            raise ValueError(f"max_tokens_per_batch={budget} is less than the longest example ({longest} tokens): "
                             f"every example must fit in a batch")
        return lengths

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _proportional(self) -> List[int]:
        epoch, within = divmod(self.step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.all_indices))
        batch = perm[within * self.batch_size: (within + 1) * self.batch_size]
        if len(batch) < self.batch_size:  # a short last epoch batch: top up from the next permutation
            extra = np.random.default_rng([self.seed, 0, epoch + 1]).permutation(len(self.all_indices))
            batch = np.concatenate([batch, extra[: self.batch_size - len(batch)]])
        return [int(self.all_indices[i]) for i in batch]

    def _uniform(self) -> List[int]:
        rng = np.random.default_rng([self.seed, 2, self.step])
        tasks = rng.integers(0, len(self.task_indices), self.batch_size)
        return [i for t in range(len(self.task_indices)) for i in self.cycles.draw(t, int((tasks == t).sum()))]

    def _candidates(self) -> List[int]:
        return [i for t in range(len(self.task_indices)) for i in self.cycles.draw(t, self.batch_size)]

    def _proportional_by_tokens(self) -> List[int]:
        """The next examples of the stream of permutations (one per epoch) that fit the budget."""
        batch: List[int] = []
        tokens = 0
        epoch, pos = self.stream
        while len(batch) < self.batch_size:
            if self._stream_perm[0] != epoch:
                self._stream_perm = (epoch, np.random.default_rng([self.seed, 0, epoch]).permutation(
                    len(self.all_indices)))
            perm = self._stream_perm[1]
            index = int(self.all_indices[perm[pos]])
            if tokens + self.lengths[index] > self.max_tokens_per_batch:
                break
            batch.append(index)
            tokens += int(self.lengths[index])
            pos += 1
            if pos == len(perm):
                epoch, pos = epoch + 1, 0
        self.stream = [epoch, pos]
        return batch

    def _uniform_by_tokens(self) -> List[int]:
        """Examples of uniformly drawn tasks while they fit the budget; the one that does not stays in its cycle."""
        rng = np.random.default_rng([self.seed, 2, self.step])
        batch: List[int] = []
        tokens = 0
        while len(batch) < self.batch_size:
            t = int(rng.integers(0, len(self.task_indices)))
            index = self.cycles.peek(t)
            if tokens + self.lengths[index] > self.max_tokens_per_batch:
                break
            batch.extend(self.cycles.draw(t, 1))
            tokens += int(self.lengths[index])
        return batch

    def next_batch(self) -> List[int]:
        if self.max_tokens_per_batch is not None and self.sampling != "mt_uncertainty":
            fn = {"proportional": self._proportional_by_tokens, "uniform": self._uniform_by_tokens}[self.sampling]
        else:
            fn = {"proportional": self._proportional, "uniform": self._uniform,
                  "mt_uncertainty": self._candidates}[self.sampling]
        batch = fn()
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[List[int]]:
        """One epoch from the current state."""
        end = (self.step // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.step < end:
            yield self.next_batch()

    def state_dict(self) -> Dict:
        return {"step": self.step, "cycles": self.cycles.state_dict(), "seed": self.seed, "sampling": self.sampling,
                "max_tokens_per_batch": self.max_tokens_per_batch, "stream": list(self.stream)}

    def load_state_dict(self, state: Dict) -> None:
        # Checkpoints written before the token budget have neither key: no budget, an unused stream.
        budget = state.get("max_tokens_per_batch")
        if state["seed"] != self.seed or state["sampling"] != self.sampling or budget != self.max_tokens_per_batch:
            raise ValueError(f"the checkpoint's sampler (seed {state['seed']}, {state['sampling']}, "
                             f"max_tokens_per_batch {budget}) differs from this run's (seed {self.seed}, "
                             f"{self.sampling}, max_tokens_per_batch {self.max_tokens_per_batch})")
        self.step = int(state["step"])
        self.cycles.load_state_dict(state["cycles"])
        self.stream = [int(x) for x in state.get("stream", (0, 0))]


def mt_uncertainty_select(entropy: torch.Tensor, task_id: torch.Tensor, batch_size: int,
                          published: bool = False, task_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The indices of the ``batch_size`` candidates with the highest uncertainty score.

    The paper: the score of an example is its normalized entropy H / log C of its task.
    published=True reproduces the published code's variant: the score is
    multiplied by its task's mean score over the max task mean, and STS-B
    candidates copy MRPC's scores (when both tasks are named in task_names).
    Ties keep the earlier candidate.
    """
    score = entropy.double()
    if published:
        T = int(task_id.max()) + 1 if task_id.numel() else 0
        onehot = torch.nn.functional.one_hot(task_id, T).double()
        task_mean = (onehot.T @ score) / onehot.sum(0).clamp_min(1)
        present = onehot.sum(0) > 0
        factor = task_mean / task_mean[present].max().clamp_min(1e-12)
        score = score * factor[task_id]
        names = list(task_names or [])
        if "sts-b" in names and "mrpc" in names:
            stsb = (task_id == names.index("sts-b")).nonzero().flatten()
            mrpc = (task_id == names.index("mrpc")).nonzero().flatten()
            n = min(len(stsb), len(mrpc))
            score[stsb[:n]] = score[mrpc[:n]]
    k = min(batch_size, score.numel())
    # A stable sort, so equal scores keep candidate order (torch.topk does not promise which tie wins).
    order = torch.sort(-score, stable=True).indices
    return order[:k]
