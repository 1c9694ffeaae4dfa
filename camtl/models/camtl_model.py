"""``CaMtl``: a CA-MTL encoder plus one head per task (the published ``src/model/ca_mtl.py``).

Keys are the published ones (``bert.*`` for the encoder, ``decoders.i.model``
for task i's Linear head), so a full published checkpoint loads strict.

For a batch that mixes tasks:
- every head runs on the pooled output after dropout 0.1, all at once: the
  heads are stacked into one [T, C_max, D] weight and each example gathers its
  task's head (no loop over tasks);
- ``logits`` is [B, C_max]; task t's columns are its first C_t, the rest are
  -inf (a regression task has one column, the predicted score);
- the loss is the published one: the mean over the tasks present of each
  task's mean loss (cross-entropy, or MSE for a regression task);
- ``entropy`` is each example's normalized prediction entropy H / log C_t
  (0 for a regression task), the MT-Uncertainty score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, PreTrainedModel
from transformers.utils import ModelOutput

from camtl.models.encoders import CaMtlBaseEncoder, CaMtlLargeEncoder

__all__ = ["CaMtl", "CaMtlOutput", "Decoder"]

_ENCODERS = {"base": CaMtlBaseEncoder, "large": CaMtlLargeEncoder}


@dataclass
class CaMtlOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # [B, C_max], -inf past each task's classes
    entropy: Optional[torch.Tensor] = None  # [B] normalized prediction entropy (detached)
    task_loss: Optional[torch.Tensor] = None  # [T] each task's mean loss, 0 for tasks absent from the batch
    task_loss_sum: Optional[torch.Tensor] = None  # [T] each task's summed loss (with grad), for distributed means
    task_count: Optional[torch.Tensor] = None  # [T] examples of each task in the batch
    sequence_output: Optional[torch.Tensor] = None
    pooled_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None


class Decoder(nn.Module):
    """A task head (published names): dropout 0.1, then ``model`` = Linear(hidden, num_labels)."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.dropout = nn.Dropout(0.1)
        self.model = nn.Linear(hidden_size, num_labels)


class CaMtl(PreTrainedModel):
    """CA-MTL encoder (``bert``) + heads (``decoders``). Built as ``CaMtl(config, task_num_labels=[...], ...)``.

    task_num_labels: one entry per task, the number of classes (1 = regression).
    layout: "base" or "large". max_seq_length: as the encoder.
    """

    config_class = BertConfig
    base_model_prefix = "camtl"

    def __init__(self, config: BertConfig, task_num_labels: Optional[Sequence[int]] = None,
                 max_seq_length: Optional[int] = None, layout: Optional[str] = None):
        task_num_labels = list(task_num_labels if task_num_labels is not None
                               else getattr(config, "task_num_labels", None) or [])
        layout = layout or getattr(config, "camtl_layout", None) or "base"
        if not task_num_labels or any(not isinstance(c, int) or c < 1 for c in task_num_labels):
            raise ValueError(f"CaMtl: task_num_labels must list each task's number of labels (>= 1), "
                             f"got {task_num_labels!r}")
        if layout not in _ENCODERS:
            raise ValueError(f"CaMtl: layout must be 'base' or 'large', got {layout!r}")
        config.task_num_labels = task_num_labels
        super().__init__(config)
        self.bert = _ENCODERS[layout](config, num_tasks=len(task_num_labels), max_seq_length=max_seq_length)
        self.decoders = nn.ModuleList([Decoder(config.hidden_size, c) for c in task_num_labels])
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and any(module is d.model for d in self.decoders):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            module.bias.data.zero_()

    @property
    def task_num_labels(self) -> List[int]:
        return list(self.config.task_num_labels)

    def _stacked_heads(self):
        """The heads as one weight [T, C_max, D] and bias [T, C_max], zero-padded past each task's classes."""
        c_max = max(self.task_num_labels)
        weights = [F.pad(d.model.weight, (0, 0, 0, c_max - d.num_labels)) for d in self.decoders]
        biases = [F.pad(d.model.bias, (0, c_max - d.num_labels)) for d in self.decoders]
        return torch.stack(weights), torch.stack(biases)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, task_id=None,
                labels=None, inputs_embeds=None, output_hidden_states=False, **kwargs) -> CaMtlOutput:
        """labels: [B], class ids for classification tasks and scores for regression ones (any float dtype)."""
        enc = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, task_id=task_id, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states)
        task_id = self.bert._check_task_id(task_id, enc.pooler_output.shape[0], enc.pooler_output.device)
        # All heads share the published dropout(0.1) of the pooled output; one gathered head per example.
        pooled = self.decoders[0].dropout(enc.pooler_output)
        weight, bias = self._stacked_heads()
        logits = torch.einsum("bd,bcd->bc", pooled, weight[task_id]) + bias[task_id]
        counts = torch.tensor(self.task_num_labels, device=logits.device)
        valid = torch.arange(logits.shape[1], device=logits.device)[None, :] < counts[task_id][:, None]
        logits = logits.masked_fill(~valid, float("-inf"))

        entropy = self._normalized_entropy(logits.detach(), counts[task_id])
        loss = task_loss = task_sum = task_count = None
        if labels is not None:
            task_sum, task_count = self._task_loss_sums(logits, labels, task_id, counts)
            task_loss = task_sum / task_count.clamp_min(1)
            loss = task_loss[task_count > 0].mean()
            task_loss = task_loss.detach()
        return CaMtlOutput(loss=loss, logits=logits, entropy=entropy, task_loss=task_loss,
                           task_loss_sum=task_sum, task_count=task_count,
                           sequence_output=enc.last_hidden_state, pooled_output=enc.pooler_output,
                           hidden_states=enc.hidden_states)

    @staticmethod
    def _normalized_entropy(logits: torch.Tensor, num_classes: torch.Tensor) -> torch.Tensor:
        """H(softmax(logits)) / log C per example; 0 for regression (C = 1)."""
        logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        h = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
        max_h = torch.log(num_classes.float()).clamp_min(1e-12)
        return torch.where(num_classes > 1, h / max_h, torch.zeros_like(h))

    def _task_loss_sums(self, logits, labels, task_id, counts):
        """([T] summed loss of each task's examples, [T] their counts): cross-entropy, or MSE terms."""
        T = len(self.task_num_labels)
        regression = counts[task_id] == 1
        labels = labels.to(logits.device)
        if labels.shape != task_id.shape:
            raise ValueError(f"CaMtl: labels must be [B]={list(task_id.shape)}, got {list(labels.shape)}")
        if not torch.compiler.is_compiling():
            out_of_range = ~regression & ((labels < 0) | (labels >= counts[task_id]) | (labels != labels.round()))
            if bool(out_of_range.any()):
                b = int(out_of_range.nonzero()[0, 0])
                raise ValueError(f"CaMtl: example {b} of task {int(task_id[b])} has label {labels[b].item()}, "
                                 f"not a class id in [0, {int(counts[task_id[b]])})")
        # Per example: cross-entropy, or squared error for regression (MSELoss's terms).
        cdt = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        safe_class = torch.where(regression, 0, labels.long()).clamp_min(0)
        ce = F.cross_entropy(logits.to(cdt).masked_fill(logits.isinf(), -1e4), safe_class, reduction="none")
        se = (logits[:, 0].to(cdt) - labels.to(cdt)) ** 2
        per_example = torch.where(regression, se, ce)
        onehot = F.one_hot(task_id, T).to(per_example.dtype)  # [B, T]: fixed-order sums, no atomics
        return onehot.T @ per_example, onehot.sum(0)
