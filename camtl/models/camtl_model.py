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

import copy
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, PreTrainedModel
from transformers.utils import ModelOutput

from camtl.models.encoders import (_HUB_KEYS, CaMtlBaseEncoder, CaMtlLargeEncoder, _CaMtlEncoder, _init,
                                   _load_state_dict_file, check_loaded_keys, check_local_path, load_checked)

__all__ = ["CaMtl", "CaMtlOutput", "Decoder"]

_ENCODERS = {"base": CaMtlBaseEncoder, "large": CaMtlLargeEncoder}


# Buffers a published checkpoint may carry that are not weights.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids)$")


def _published_keys(checkpoint: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A published CaMtl state dict without the non-weight buffers (its keys are already ours)."""
    return {k: v for k, v in checkpoint.items() if not _IGNORED_KEYS.search(k)}


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
    """CA-MTL encoder (``bert``) + heads (``decoders``).

    Ways to build one:
    - ``CaMtl(config, task_num_labels=[...], max_seq_length=..., layout="base")``: random weights;
    - ``CaMtl.from_encoder(encoder, task_num_labels)``: around an encoder already built or loaded
      (e.g. ``CaMtlBaseEncoder.from_pretrained(bert_path, ...)``), with new heads;
    - ``CaMtl.from_pretrained(path, ...)``: a saved CaMtl, or a plain BERT checkpoint converted (see there).

    task_num_labels: one entry per task, the number of classes (1 = regression).
    layout: "base" or "large". max_seq_length: as the encoder.
    """

    config_class = BertConfig
    base_model_prefix = "camtl"

    def __init__(self, config: BertConfig, task_num_labels: Optional[Sequence[int]] = None,
                 max_seq_length: Optional[int] = None, layout: Optional[str] = None,
                 _encoder: Optional[_CaMtlEncoder] = None):
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
        if _encoder is None:
            self.bert = _ENCODERS[layout](config, num_tasks=len(task_num_labels), max_seq_length=max_seq_length)
        else:
            for module in _encoder.modules():  # already initialized or loaded: post_init must leave it alone
                module._is_hf_initialized = True
            self.bert = _encoder
        self.decoders = nn.ModuleList([Decoder(config.hidden_size, c) for c in task_num_labels])
        self.post_init()

    @classmethod
    def from_encoder(cls, encoder: _CaMtlEncoder, task_num_labels: Sequence[int]) -> "CaMtl":
        """A CaMtl around ``encoder`` (used as is, not copied: its weights stay) with new heads.

        The heads get the encoder's device and dtype. The model's config is a copy of the encoder's
        plus ``task_num_labels`` (the encoder's own config is left as it is).
        """
        if not isinstance(encoder, _CaMtlEncoder):
            raise TypeError(f"CaMtl.from_encoder: encoder must be a CaMtlBaseEncoder or CaMtlLargeEncoder, "
                            f"got {type(encoder).__name__}")
        task_num_labels = list(task_num_labels)
        if len(task_num_labels) != encoder.config.num_tasks:
            raise ValueError(f"CaMtl.from_encoder: task_num_labels has {len(task_num_labels)} tasks but the "
                             f"encoder has num_tasks={encoder.config.num_tasks}")
        model = cls(copy.deepcopy(encoder.config), task_num_labels=task_num_labels,
                    max_seq_length=encoder.config.max_seq_length, layout=encoder.layout, _encoder=encoder)
        weight = encoder.task_type_embeddings.weight
        model.decoders.to(device=weight.device, dtype=weight.dtype)
        return model.train(encoder.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args,
                        task_num_labels: Optional[Sequence[int]] = None, max_seq_length: Optional[int] = None,
                        layout: Optional[str] = None, init_top_layer_from_pretrained: bool = False,
                        strict: bool = True, **kwargs) -> "CaMtl":
        """Loads a CaMtl saved by ``save_pretrained``; or builds one from another checkpoint:

        - a plain BERT checkpoint: converted as ``CaMtlBaseEncoder/CaMtlLargeEncoder.from_pretrained``
          converts it (the CA-MTL modules and the heads start initialized); needs task_num_labels and
          max_seq_length, layout defaults to "base";
        - a CA-MTL encoder saved by ``save_pretrained``: loaded, with new heads (task_num_labels);
        - a published CA-MTL checkpoint (``bert.*`` and ``decoders.i.model.*`` keys, a plain BertConfig):
          loaded as is; needs task_num_labels, max_seq_length and layout.

        strict (default True): weights the model needs that the checkpoint lacks, or weights the model
        has no place for, raise a ``CheckpointKeysError`` naming them; ``strict=False`` warns instead.
        """
        path = check_local_path(pretrained_model_name_or_path)
        name = f"CaMtl.from_pretrained({path!s})"
        config = kwargs.pop("config", None)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
        config = BertConfig.from_pretrained(path, **hub_kwargs) if config is None else copy.deepcopy(config)
        saved_layout = getattr(config, "camtl_layout", None)
        if saved_layout and getattr(config, "task_num_labels", None):  # a saved CaMtl
            for arg, value, saved in (("task_num_labels", task_num_labels, config.task_num_labels),
                                      ("max_seq_length", max_seq_length, config.max_seq_length),
                                      ("layout", layout, saved_layout)):
                if value is not None and (list(value) if arg == "task_num_labels" else value) != saved:
                    raise ValueError(f"{name}: the checkpoint was saved with {arg}={saved!r}, not {value!r}")
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(path, *model_args, config=config, output_loading_info=True,
                                                  **kwargs)
            check_loaded_keys(name, info["missing_keys"], info["unexpected_keys"], strict,
                              mismatched=[k for k, *_ in info.get("mismatched_keys", [])])
            return (model, info) if want_info else model
        if task_num_labels is None:
            raise ValueError(f"{name}: the checkpoint holds no CaMtl heads; give task_num_labels "
                             f"(one entry per task, its number of labels)")
        layout = layout or saved_layout or "base"
        if layout not in _ENCODERS:
            raise ValueError(f"CaMtl: layout must be 'base' or 'large', got {layout!r}")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if saved_layout:  # a saved encoder
            encoder = _ENCODERS[layout].from_pretrained(path, *model_args, config=config,
                                                        num_tasks=len(list(task_num_labels)),
                                                        max_seq_length=max_seq_length, strict=strict, **kwargs)
            return cls.from_encoder(encoder, task_num_labels)
        if max_seq_length is None:
            raise ValueError(f"{name}: building a CaMtl from the plain checkpoint {path} needs max_seq_length")
        checkpoint = _load_state_dict_file(path, **hub_kwargs)
        if any(k.startswith("decoders.") for k in checkpoint):  # a published CA-MTL checkpoint, heads included
            model = cls(config, task_num_labels=list(task_num_labels), max_seq_length=max_seq_length, layout=layout)
            if isinstance(dtype, torch.dtype):
                model = model.to(dtype)
            load_checked(model, _published_keys(checkpoint), name, strict)
        else:
            encoder = _ENCODERS[layout]._convert(name, config, checkpoint, len(list(task_num_labels)),
                                                 max_seq_length, init_top_layer_from_pretrained, strict, dtype)
            model = cls.from_encoder(encoder, task_num_labels)
        return model.eval()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and any(module is d.model for d in self.decoders):
            _init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            _init.zeros_(module.bias)

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
                labels=None, inputs_embeds=None, output_hidden_states=False, cu_seqlens=None, max_seqlen=None,
                **kwargs) -> CaMtlOutput:
        """labels: [B], class ids for classification tasks and scores for regression ones (any float dtype).

        Packed input (the encoder's forward says how): task_id and labels are [S], one per sequence; the
        logits, entropy and loss are per sequence, sequence_output is [1, N, D]."""
        enc = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, task_id=task_id, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
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
        onehot = F.one_hot(task_id, T).bool()  # [B, T]: fixed-order sums, no atomics
        # A select, not a one-hot GEMM: one example's NaN stays in its own task's sum (NaN * 0 is NaN).
        task_sum = torch.where(onehot, per_example[:, None], torch.zeros((), dtype=per_example.dtype,
                                                                        device=per_example.device)).sum(0)
        return task_sum, onehot.sum(0).to(per_example.dtype)
