"""CA-MTL encoders on HF transformers: ``CaMtlBaseEncoder`` and ``CaMtlLargeEncoder``.

State-dict keys are those of the published encoders of the same names
(CAMTL/CA-MTL, ``src/model/encoders/ca_mtl_{base,large}.py``), so a published
encoder state dict loads with ``strict=True`` and gives the published outputs.
Every conditional piece runs through ``camtl.nn`` / ``camtl.ops``, so every
backend applies. The FiLM generators run once per task (on the [T, D] task
table), and each example gathers its task's row: equal to the published
per-example computation, whose rows of one task are equal.

Layouts (L = config.num_hidden_layers):
- base: layers [0, L/2) plain BERT with conditional attention; [L/2, L-1) add a
  conditional layer norm (CLN) in both sublayers; the last layer
  (``new_attention``, ``new_intermediate``, ``new_output``, ``adapter``) is
  trained from scratch, adapter = CLN(bottleneck(layer_out) + attention_out).
- large: the first ceil(L/2) layers plain, the rest with CLN, and L
  bottlenecks ``encoder.adapter_layer.i`` chained as hf = bottleneck(h_i + hf);
  the encoder returns hf.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from transformers import BertConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from camtl.nn import ConditionalBottleNeck, ConditionalLayerNorm, ConditionalSelfAttention, FiLM
from camtl.ops import index_read_once

try:  # transformers >= 5: init functions that skip the tensors a checkpoint loaded
    from transformers import initialization as _init
except ImportError:  # transformers 4 initializes before loading
    from torch.nn import init as _init

__all__ = ["CaMtlBaseEncoder", "CaMtlLargeEncoder", "CheckpointKeysError", "bert_to_camtl_state_dict"]

_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# A hub repo id: "name" or "namespace/name".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class CheckpointKeysError(ValueError):
    """A checkpoint lacks weights the model needs, or holds weights the model has no place for."""


def check_local_path(name_or_path):
    """``name_or_path``, ~ expanded; FileNotFoundError when it names a local path that does not exist.

    Local: a ``os.PathLike``, or a string that starts with ".", "/" or "~", or that
    has a path separator and is no hub repo id ("namespace/name"), or whose first
    folder exists here. Anything else is left to the hub.
    """
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.exists(path):
        return path
    text = os.fspath(name_or_path)
    seps = [sep for sep in (os.sep, os.altsep) if sep]
    first = re.split("|".join(map(re.escape, seps)), text)[0]
    local = (isinstance(name_or_path, os.PathLike) or text.startswith((".", "/", "~"))
             or (any(sep in text for sep in seps) and (not _REPO_ID.fullmatch(text) or os.path.isdir(first))))
    if local:
        raise FileNotFoundError(f"no such checkpoint folder: {path!r} (a local path that does not exist)")
    return name_or_path


def _first(keys: Sequence[str], count: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:count]) + (f", ... ({len(keys)} in all)" if len(keys) > count else f" ({len(keys)})")


def check_loaded_keys(name: str, missing: Sequence[str], unexpected: Sequence[str], strict: bool,
                      mismatched: Sequence[str] = ()) -> None:
    """Raises CheckpointKeysError naming the missing / unexpected / mismatched keys; a warning when not strict."""
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (they would start untrained): {_first(sorted(missing))}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {_first(sorted(unexpected))}")
    if mismatched:
        problems.append(f"of another shape in the checkpoint: {_first(sorted(mismatched))}")
    if not problems:
        return
    text = f"{name}: the checkpoint does not fit the model's weights: " + "; ".join(problems)
    if strict:
        raise CheckpointKeysError(text + ". Check the checkpoint and the config (e.g. num_hidden_layers); "
                                  "strict=False loads anyway and initializes the missing weights.")
    warnings.warn(text + " (strict=False: loaded anyway, the missing weights initialized)", stacklevel=3)


def load_checked(model: nn.Module, state: Dict[str, torch.Tensor], name: str, strict: bool,
                 new_keys: Optional["re.Pattern"] = None, unplaced: Sequence[str] = ()) -> List[str]:
    """model.load_state_dict(state) that raises on other shapes, and on missing keys (but ``new_keys``) or
    unexpected ones (and ``unplaced``) through check_loaded_keys. Returns the missing keys."""
    model_state = model.state_dict()
    shapes = {k: (tuple(v.shape), tuple(model_state[k].shape)) for k, v in state.items()
              if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)}
    if shapes:
        raise ValueError(f"{name}: the checkpoint's shapes do not fit the model (checkpoint, model): {shapes}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    check_loaded_keys(name, [k for k in missing if new_keys is None or not new_keys.search(k)],
                      list(unplaced) + list(unexpected), strict)
    return list(missing)


class _Embeddings(nn.Module):
    """BERT embeddings (same keys as transformers' BertEmbeddings)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        embeds = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(L, device=embeds.device).expand(B, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros((B, L), dtype=torch.long, device=embeds.device)
        out = embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(out))


class _Packing(NamedTuple):
    """Packed input's sequences (DESIGN.md §8): the tokens run as [N, 1, D], one "example" each, with a
    per-token task index; only the attention needs these boundaries."""

    task_id: torch.Tensor  # [S] one task per sequence
    cu_seqlens: torch.Tensor  # [S+1] int32 boundaries
    max_seqlen: int  # the longest sequence


class _SublayerOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + input), the LayerNorm plain or conditional (fused residual add)."""

    def __init__(self, config, in_features, conditional):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.conditional = conditional
        if conditional:
            self.LayerNorm = ConditionalLayerNorm(config.hidden_size, config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor, tasks, task_id):
        hidden_states = self.dropout(self.dense(hidden_states))
        if self.conditional:
            return self.LayerNorm(hidden_states, tasks, task_id, residual=input_tensor, condition_per_task=True)
        return self.LayerNorm(hidden_states + input_tensor)


class _Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) \
            else config.hidden_act

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class _Attention(nn.Module):
    """``attention.self`` (conditional attention) and ``attention.output``."""

    def __init__(self, config, conditional_ln):
        super().__init__()
        self.self = ConditionalSelfAttention(config)
        self.output = _SublayerOutput(config, config.hidden_size, conditional_ln)

    def forward(self, hidden_states, key_mask, tasks, task_id, output_attentions, packing=None):
        if packing is None:
            context, *probs = self.self(hidden_states, key_mask, task_embedding=tasks, task_id=task_id,
                                        output_attentions=output_attentions)
        else:  # [N, 1, D] tokens: the attention runs on [N, D] within each sequence
            context, *probs = self.self(hidden_states[:, 0], task_embedding=tasks, task_id=packing.task_id,
                                        output_attentions=output_attentions, cu_seqlens=packing.cu_seqlens,
                                        max_seqlen=packing.max_seqlen)
            context = context[:, None]
        return self.output(context, hidden_states, tasks, task_id), (probs[0] if probs else None)


class _Layer(nn.Module):
    """A BERT layer with conditional attention; with ``conditional_ln`` both sublayers use a CLN."""

    def __init__(self, config, conditional_ln):
        super().__init__()
        self.attention = _Attention(config, conditional_ln)
        self.intermediate = _Intermediate(config)
        self.output = _SublayerOutput(config, config.intermediate_size, conditional_ln)

    def forward(self, hidden_states, key_mask, tasks, task_id, output_attentions, packing=None):
        attention_output, probs = self.attention(hidden_states, key_mask, tasks, task_id, output_attentions,
                                                 packing)
        out = self.output(self.intermediate(attention_output), attention_output, tasks, task_id)
        return out, probs


class _Adapter(nn.Module):
    """adapter(attention_out, layer_out) = CLN(bottleneck(layer_out) + attention_out)."""

    def __init__(self, config):
        super().__init__()
        self.bottleneck = ConditionalBottleNeck(config)
        self.condlayernorm = ConditionalLayerNorm(config.hidden_size, config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, attention_output, layer_output, tasks, task_id):
        hidden = self.bottleneck(tasks, layer_output, task_id=task_id)
        return self.condlayernorm(hidden, tasks, task_id, residual=attention_output, condition_per_task=True)


class _AdapterLayer(nn.Module):
    """The base layout's top layer, trained from scratch (published sublayer names)."""

    def __init__(self, config):
        super().__init__()
        self.new_attention = _Attention(config, conditional_ln=True)
        self.new_intermediate = _Intermediate(config)
        self.new_output = _SublayerOutput(config, config.intermediate_size, conditional=True)
        self.adapter = _Adapter(config)

    def forward(self, hidden_states, key_mask, tasks, task_id, output_attentions, packing=None):
        attention_output, probs = self.new_attention(hidden_states, key_mask, tasks, task_id, output_attentions,
                                                     packing)
        layer_output = self.new_output(self.new_intermediate(attention_output), attention_output, tasks, task_id)
        return self.adapter(attention_output, layer_output, tasks, task_id), probs


class _Encoder(nn.Module):
    def __init__(self, config, layout):
        super().__init__()
        self.layout = layout
        n = config.num_hidden_layers
        self.task_transformation = nn.Linear(config.hidden_size, config.hidden_size)
        if layout == "base":
            plain, conditional = n // 2, n // 2 - 1
            self.layer = nn.ModuleList([_Layer(config, False) for _ in range(plain)]
                                       + [_Layer(config, True) for _ in range(conditional)]
                                       + [_AdapterLayer(config)])
        else:
            plain = n // 2 + n % 2
            self.layer = nn.ModuleList([_Layer(config, False) for _ in range(plain)]
                                       + [_Layer(config, True) for _ in range(n - plain)])
            self.adapter_layer = nn.ModuleList([ConditionalBottleNeck(config) for _ in range(n)])

    def forward(self, hidden_states, key_mask, tasks, task_id, output_hidden_states, output_attentions,
                packing=None):
        """Padded: hidden_states [B, L, D], task_id [B]. Packed: [N, 1, D], task_id the per-token index [N]."""
        tasks = self.task_transformation(tasks)  # z' for the attention, the CLNs and the bottlenecks
        all_hidden: List[torch.Tensor] = []
        all_probs: List[torch.Tensor] = []
        hidden_film = torch.zeros_like(hidden_states) if self.layout == "large" else None
        for i, layer in enumerate(self.layer):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, probs = layer(hidden_states, key_mask, tasks, task_id, output_attentions, packing)
            if output_attentions:
                all_probs.append(probs)
            if self.layout == "large":  # chained bottlenecks with a skip connection
                hidden_film = self.adapter_layer[i](tasks, hidden_states + hidden_film, task_id=task_id)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        out = hidden_states if self.layout == "base" else hidden_film
        return out, (tuple(all_hidden) if output_hidden_states else None), \
            (tuple(all_probs) if output_attentions else None)


class _Pooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return torch.tanh(self.dense(hidden_states[:, 0]))


class _CaMtlEncoder(PreTrainedModel):
    """Shared by both layouts. Built as ``Cls(config: BertConfig, num_tasks=T, max_seq_length=L)``."""

    config_class = BertConfig
    base_model_prefix = "bert"
    layout = ""

    def __init__(self, config: BertConfig, num_tasks: Optional[int] = None, max_seq_length: Optional[int] = None):
        num_tasks = num_tasks if num_tasks is not None else getattr(config, "num_tasks", None)
        max_seq_length = max_seq_length if max_seq_length is not None else getattr(config, "max_seq_length", None)
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"{type(self).__name__}: num_tasks must be a positive int, got {num_tasks!r}")
        if not isinstance(max_seq_length, int) or max_seq_length < 1:
            raise ValueError(f"{type(self).__name__}: max_seq_length must be a positive int, got {max_seq_length!r}")
        if max_seq_length > config.max_position_embeddings:
            raise ValueError(f"{type(self).__name__}: max_seq_length={max_seq_length} is greater than the "
                             f"model's max_position_embeddings={config.max_position_embeddings}")
        if self.layout == "base" and (config.num_hidden_layers < 2 or config.num_hidden_layers % 2):
            raise ValueError(f"CaMtlBaseEncoder needs an even number of layers >= 2 (as published), "
                             f"got num_hidden_layers={config.num_hidden_layers}")
        config.num_tasks = num_tasks
        config.max_seq_length = max_seq_length
        config.camtl_layout = self.layout
        super().__init__(config)
        # The published construction order (it fixes the random init for a given seed).
        self.task_type_embeddings = nn.Embedding(num_tasks, config.hidden_size)
        self.conditional_alignment = FiLM(config.hidden_size, config.hidden_size)
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config, self.layout)
        self.pooler = _Pooler(config)
        self.post_init()

    def _init_weights(self, module):
        """BERT's init, and the published init of the conditional pieces: CBDA matrices and FiLM biases zero,
        CLN weights one. Through ``transformers.initialization`` (v5), which skips the tensors a checkpoint
        loaded, so only missing ones are initialized."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.LayerNorm, ConditionalLayerNorm)):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, ConditionalSelfAttention):
            _init.zeros_(module.random_weight_matrix)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, num_tasks: Optional[int] = None,
                        max_seq_length: Optional[int] = None, init_top_layer_from_pretrained: bool = False,
                        strict: bool = True, **kwargs):
        """Loads a CA-MTL checkpoint (saved by ``save_pretrained``), or converts a plain BERT one.

        A plain BERT checkpoint (BertModel keys) needs num_tasks and
        max_seq_length; every pretrained weight is copied to its place, the
        conditional modules start as published (FiLM biases and CBDA matrices
        zero, CLN weights from the pretrained LayerNorms). The base layout's new
        top layer starts fresh, or from the pretrained top layer with
        ``init_top_layer_from_pretrained=True``. A published CA-MTL encoder's
        weights (CA-MTL keys, maybe under ``bert.``, beside a plain BertConfig)
        load as they are.

        strict (default True): a weight the model needs that the checkpoint
        lacks (e.g. a config with more layers than the weights), or a weight the
        model has no place for, raises a ``CheckpointKeysError`` naming them.
        The CA-MTL modules a conversion adds are new, not missing. With
        ``strict=False`` these are warnings, and missing weights get the
        model's initialization.
        """
        pretrained_model_name_or_path = check_local_path(pretrained_model_name_or_path)
        config = kwargs.pop("config", None)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
        if config is None:
            config = BertConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        else:
            config = copy.deepcopy(config)  # the model writes num_tasks, max_seq_length, layout into its config
        name = f"{cls.__name__}.from_pretrained({pretrained_model_name_or_path!s})"
        layout = getattr(config, "camtl_layout", None)
        if layout:
            if layout != cls.layout:
                raise ValueError(f"{pretrained_model_name_or_path} holds a CA-MTL {layout} encoder, "
                                 f"not a {cls.layout} one: load it with the matching class")
            for arg, value in (("num_tasks", num_tasks), ("max_seq_length", max_seq_length)):
                if value is not None and value != getattr(config, arg):
                    raise ValueError(f"{pretrained_model_name_or_path} was saved with {arg}="
                                     f"{getattr(config, arg)}, not {value}")
            want_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config,
                                                  output_loading_info=True, **kwargs)
            check_loaded_keys(name, info["missing_keys"], info["unexpected_keys"], strict,
                              mismatched=[k for k, *_ in info.get("mismatched_keys", [])])
            return (model, info) if want_info else model
        if num_tasks is None or max_seq_length is None:
            raise ValueError(f"converting the plain BERT checkpoint {pretrained_model_name_or_path} needs "
                             f"num_tasks and max_seq_length")
        model = cls._convert(name, config, _load_state_dict_file(pretrained_model_name_or_path, **hub_kwargs),
                             num_tasks, max_seq_length, init_top_layer_from_pretrained, strict,
                             kwargs.get("dtype", kwargs.get("torch_dtype")))
        return model.eval()

    @classmethod
    def _convert(cls, name: str, config, checkpoint: Dict[str, torch.Tensor], num_tasks: int, max_seq_length: int,
                 init_top_layer_from_pretrained: bool, strict: bool, dtype=None) -> "_CaMtlEncoder":
        """A new encoder holding ``checkpoint``: BertModel weights (converted), or a published CA-MTL encoder's.

        dtype: a torch.dtype the model is built in before loading (else float32)."""
        model = cls(config, num_tasks=num_tasks, max_seq_length=max_seq_length)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        stripped = {_strip_prefix(k): v for k, v in checkpoint.items()}
        if "task_type_embeddings.weight" in stripped:  # already CA-MTL (a published encoder): nothing is new
            state = {k: v for k, v in stripped.items() if not _IGNORED_BERT_KEYS.search(k)}
            unplaced, new = [], None
        else:
            state, unplaced = bert_to_camtl_state_dict(checkpoint, cls.layout, config.num_hidden_layers,
                                                       init_top_layer_from_pretrained, return_unplaced=True)
            new = _converted_new_keys(cls.layout, config.num_hidden_layers, init_top_layer_from_pretrained)
        missing = load_checked(model, state, name, strict, new_keys=new, unplaced=unplaced)
        model.camtl_converted_missing_keys = sorted(missing)  # what starts fresh, for the curious
        return model

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def _check_task_id(self, task_id, batch: int, device, what: str = "B", meaning: str = "example") \
            -> torch.Tensor:
        name = type(self).__name__
        if task_id is None:
            raise ValueError(f"{name}: task_id [{what}] is required (the task of each {meaning})")
        task_id = torch.as_tensor(task_id, device=device)
        if task_id.dim() == 0:
            task_id = task_id.expand(batch)
        if task_id.dim() != 1 or task_id.shape[0] != batch or task_id.is_floating_point() \
                or task_id.dtype == torch.bool:
            raise ValueError(f"{name}: task_id must be an integer tensor of shape [{what}={batch}] (one per "
                             f"{meaning}), got {tuple(task_id.shape)} {task_id.dtype}")
        return task_id.long()

    @staticmethod
    def _is_packed(input_ids, inputs_embeds, position_ids, task_id, cu_seqlens, max_seqlen) -> bool:
        """Packed input: cu_seqlens / max_seqlen given, 1-D input_ids ([N]), or one row [1, N] with
        position_ids restarting at 0 or several task ids (a padded batch of one has one task)."""
        if cu_seqlens is not None or max_seqlen is not None:
            return True
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens.dim() == (1 if input_ids is not None else 2):
            return True
        if tokens.dim() != (2 if input_ids is not None else 3) or tokens.shape[0] != 1:
            return False
        if task_id is not None and not isinstance(task_id, (int, float)) and torch.as_tensor(task_id).dim() == 1 \
                and len(task_id) > 1:
            return True
        return isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
            and tuple(position_ids.shape) == tuple(tokens.shape[:2]) and bool((position_ids[0, 1:] == 0).any())

    def _packing(self, N: int, device, attention_mask, position_ids, token_type_ids, task_id, cu_seqlens,
                 max_seqlen):
        """Checks packed input; returns (_Packing, per-token task index [N], position_ids [N],
        token_type_ids [N] or None)."""
        name = type(self).__name__
        if attention_mask is not None:
            raise ValueError(f"{name}: attention_mask must be None with packed input (position_ids restarting "
                             f"at 0 or cu_seqlens): packed sequences have no padding")
        if N == 0:
            raise ValueError(f"{name}: packed input_ids must be [1, N] or [N] with N >= 1 tokens, got N=0")

        def flat(arg, value):
            if value is None:
                return None
            value = torch.as_tensor(value, device=device)
            if tuple(value.shape) not in ((1, N), (N,)) or value.is_floating_point() or value.dtype == torch.bool:
                raise ValueError(f"{name}: packed {arg} must be an integer tensor [1, N={N}] or [N], got "
                                 f"{tuple(value.shape)} {value.dtype}")
            return value.reshape(N).long()

        position_ids, token_type_ids = flat("position_ids", position_ids), flat("token_type_ids", token_type_ids)
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 \
                    or cu_seqlens.dtype not in (torch.int32, torch.int64):
                got = (f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}" if isinstance(cu_seqlens, torch.Tensor)
                       else type(cu_seqlens).__name__)
                raise ValueError(f"{name}: cu_seqlens must be an int32 tensor [S+1] (S >= 1 sequences), got {got}")
            cu = cu_seqlens.to(device=device, dtype=torch.int64)
            if int(cu[0]) != 0 or int(cu[-1]) != N or bool((cu[1:] <= cu[:-1]).any()):
                raise ValueError(f"{name}: cu_seqlens must start at 0, strictly increase and end at N={N} (the "
                                 f"number of tokens), got {cu.tolist()}")
            starts = torch.zeros(N, dtype=torch.bool, device=device)
            starts[cu[:-1]] = True
        else:
            if position_ids is None:
                raise ValueError(f"{name}: packed input needs position_ids [1, N] restarting at 0 for each "
                                 f"sequence, or cu_seqlens [S+1]")
            starts = position_ids == 0
            cu = torch.cat([starts.nonzero()[:, 0], torch.tensor([N], device=device)])
        # Counted from each sequence's start: 0, 1, 2, ... (a prefix max of the start indices).
        start_of = torch.cummax(torch.where(starts, torch.arange(N, device=device), 0), 0).values
        counted = torch.arange(N, device=device) - start_of
        if position_ids is not None and not torch.equal(position_ids, counted):
            bad = int((position_ids != counted).nonzero()[0, 0])
            source = "the sequences of cu_seqlens" if cu_seqlens is not None else "restarting at 0"
            raise ValueError(f"{name}: position_ids must count 0, 1, 2, ... within each sequence ({source}); "
                             f"token {bad} has position {int(position_ids[bad])}, expected {int(counted[bad])}")
        lengths = cu.diff()
        longest = int(lengths.max())
        if longest > self.config.max_seq_length:
            s = int(lengths.argmax())
            raise ValueError(f"{name}: packed sequence {s} has {longest} tokens, more than max_seq_length="
                             f"{self.config.max_seq_length}; truncate it")
        if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < longest):
            raise ValueError(f"{name}: max_seqlen must be an int >= the longest sequence ({longest}), "
                             f"got {max_seqlen!r}")
        S = cu.shape[0] - 1
        task_id = self._check_task_id(task_id, S, device, what="S", meaning="packed sequence")
        token_index = task_id.repeat_interleave(lengths, output_size=N)
        packing = _Packing(task_id, cu.to(torch.int32), longest)
        return packing, token_index, counted, token_type_ids

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, task_id=None,
                inputs_embeds=None, output_hidden_states=False, output_attentions=False, return_dict=True,
                cu_seqlens=None, max_seqlen=None, **kwargs) -> BaseModelOutputWithPooling:
        """[0] the sequence output [B, L, D], [1] the pooled output [B, D]; ``.hidden_states`` when asked.

        L may be any batch length <= max_seq_length (dynamic padding).

        Packed input (DESIGN.md §8, as HF's padding-free collator and flash-attn's varlen functions):
        input_ids [1, N] or [N] (inputs_embeds [1, N, D] or [N, D]) holding S sequences end to end,
        position_ids [1, N] restarting at 0 for each sequence and/or cu_seqlens int32 [S+1] (with an
        optional max_seqlen), token_type_ids [1, N], task_id [S], no attention_mask. Returns
        last_hidden_state [1, N, D], pooler_output [S, D] (each sequence's first token), hidden_states
        [1, N, D] each and attentions [S, H, Lmax, Lmax] each; on every token what the padded model gives.
        """
        name = type(self).__name__
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{name}: give exactly one of input_ids and inputs_embeds")
        packing = None
        if self._is_packed(input_ids, inputs_embeds, position_ids, task_id, cu_seqlens, max_seqlen):
            tokens = input_ids if input_ids is not None else inputs_embeds
            rank = 1 if input_ids is not None else 2
            if tokens.dim() not in (rank, rank + 1) or (tokens.dim() == rank + 1 and tokens.shape[0] != 1):
                want = "input_ids [1, N] or [N]" if input_ids is not None else "inputs_embeds [1, N, D] or [N, D]"
                raise ValueError(f"{name}: packed input must be {want}, got {tuple(tokens.shape)}")
            N = tokens.shape[-1] if input_ids is not None else tokens.shape[-2]
            packing, task_id, position_ids, token_type_ids = self._packing(
                N, tokens.device, attention_mask, position_ids, token_type_ids, task_id, cu_seqlens, max_seqlen)
            # Each token runs as one example [N, 1, ...] with its sequence's task (the token-wise ops).
            if input_ids is not None:
                input_ids = input_ids.reshape(N, 1)
            else:
                inputs_embeds = inputs_embeds.reshape(N, 1, inputs_embeds.shape[-1])
            position_ids = position_ids[:, None]
            token_type_ids = token_type_ids[:, None] if token_type_ids is not None else None
            attention_mask = torch.ones(N, 1, device=tokens.device)
        shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:2])
        if len(shape) != 2:
            raise ValueError(f"{name}: input_ids must be [B, L], got {shape}")
        B, L = shape
        if B == 0 or L == 0:
            raise ValueError(f"{name}: input_ids must be [B, L] with B >= 1 examples and L >= 1 tokens "
                             f"(L <= max_seq_length={self.config.max_seq_length}), got {shape}")
        if L > self.config.max_seq_length:
            raise ValueError(f"{name}: the batch length {L} is greater than max_seq_length="
                             f"{self.config.max_seq_length}; truncate the inputs")
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        task_id = self._check_task_id(task_id, B, device)
        if attention_mask is None:
            attention_mask = torch.ones(shape, device=device)
        if tuple(attention_mask.shape) != shape:
            raise ValueError(f"{name}: attention_mask must be [B, L]={list(shape)}, got {list(attention_mask.shape)}")
        dtype = self.task_type_embeddings.weight.dtype
        # The published additive mask, in its published [B, 1, 1, L] layout.
        key_mask = ((1.0 - attention_mask.to(dtype)) * -10000.0)[:, None, None, :]
        if packing is not None:
            key_mask = None  # no padding: the attention runs within each sequence

        tasks = self.task_type_embeddings.weight  # one row per task: every FiLM runs once per task
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        # The ops check the task ids' range once, not once each (packed: the sequences' ids too).
        with index_read_once(task_id), index_read_once(packing.task_id if packing is not None else None):
            hidden = self.conditional_alignment(tasks, hidden, task_id=task_id)  # the raw task embedding z
            sequence_output, all_hidden, all_probs = self.encoder(hidden, key_mask, tasks, task_id,
                                                                  output_hidden_states, output_attentions, packing)
        if packing is None:
            pooled_output = self.pooler(sequence_output)
        else:  # each sequence's first token; the tokens back to [1, N, D]
            pooled_output = self.pooler(sequence_output[packing.cu_seqlens[:-1].long()])
            sequence_output = sequence_output.transpose(0, 1)
            all_hidden = tuple(h.transpose(0, 1) for h in all_hidden) if all_hidden is not None else None
        out = BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                         hidden_states=all_hidden, attentions=all_probs)
        return out if return_dict else out.to_tuple()


def _load_state_dict_file(name_or_path: str, **hub_kwargs) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint (local folder or hub name): model.safetensors, else pytorch_model.bin."""
    from transformers.utils import cached_file

    path = cached_file(name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if path is not None:
        from safetensors.torch import load_file

        return load_file(path)
    path = cached_file(name_or_path, "pytorch_model.bin", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if path is None:
        raise FileNotFoundError(f"{name_or_path}: no model.safetensors or pytorch_model.bin found")
    return torch.load(path, map_location="cpu", weights_only=True)


# Buffers some BERT checkpoints carry that are not weights.
_IGNORED_BERT_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids)$")
_BERT_PREFIXES = ("bert.", "model.")


def _strip_prefix(key: str) -> str:
    for prefix in _BERT_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _converted_new_keys(layout: str, num_layers: int, init_top_layer_from_pretrained: bool) -> "re.Pattern":
    """The keys a conversion from BERT adds (the CA-MTL modules): they start initialized, not loaded."""
    top = rf"encoder\.layer\.{num_layers - 1}\." + (r"adapter\." if init_top_layer_from_pretrained else "")
    patterns = [r"^(task_type_embeddings|conditional_alignment)\.", r"^encoder\.(task_transformation|adapter_layer)\.",
                r"\.(cond_block_diag_attn|ln_weight_modulation)\.", r"\.random_weight_matrix$"]
    if layout == "base":
        patterns.append("^" + top)
    return re.compile("|".join(patterns))


def bert_to_camtl_state_dict(bert_state: Dict[str, torch.Tensor], layout: str, num_layers: int,
                             init_top_layer_from_pretrained: bool = False, return_unplaced: bool = False):
    """Maps a BertModel state dict (keys embeddings.*, encoder.layer.i.*, pooler.*) onto the CA-MTL keys.

    Plain LayerNorm weights land on the conditional layer norms' ``weight``/``bias``
    (same key names). The base layout's top layer is new (``new_attention`` ...):
    its pretrained weights are dropped, or copied there with
    ``init_top_layer_from_pretrained``. Raises if a pretrained weight has no place,
    unless ``return_unplaced``: then returns (state dict, the unplaced keys).
    """
    out, unplaced = {}, []
    top = f"encoder.layer.{num_layers - 1}."
    renames = {"attention.": "new_attention.", "intermediate.": "new_intermediate.", "output.": "new_output."}
    for key, value in bert_state.items():
        key = _strip_prefix(key)
        if _IGNORED_BERT_KEYS.search(key) or key.startswith(("cls.", "lm_head.")):
            continue
        if not key.startswith(("embeddings.", "encoder.layer.", "pooler.")):
            unplaced.append(key)
            continue
        if layout == "base" and key.startswith(top):
            if not init_top_layer_from_pretrained:
                continue
            rest = key[len(top):]
            head = next((old for old in renames if rest.startswith(old)), None)
            if head is None:
                unplaced.append(key)
                continue
            key = top + renames[head] + rest[len(head):]
        out[key] = value
    if return_unplaced:
        return out, unplaced
    if unplaced:
        raise KeyError(f"these pretrained weights have no place in a CA-MTL {layout} encoder: {unplaced[:8]}"
                       + (" ..." if len(unplaced) > 8 else ""))
    return out


class CaMtlBaseEncoder(_CaMtlEncoder):
    """CA-MTL base layout (the published ``CaMtlBaseEncoder``)."""

    layout = "base"


class CaMtlLargeEncoder(_CaMtlEncoder):
    """CA-MTL large layout (the published ``CaMtlLargeEncoder``)."""

    layout = "large"
