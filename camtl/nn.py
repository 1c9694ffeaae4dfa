"""Drop-in CA-MTL modules.

Each module keeps the published (CAMTL/CA-MTL, ``src/model/encoders/``)
constructor arguments, parameter names and initialisation, and forward
signature and return type, so a published state dict loads with
``strict=True`` and gives the same outputs. Inside, they call ``camtl.ops``:
no Python loop over tasks or examples, no per-example ``block_diag``.

    # from src.model.encoders.conditional_modules import FiLM, CBDA, ConditionalLayerNorm, ConditionalBottleNeck
    from camtl.nn import FiLM, CBDA, ConditionalLayerNorm, ConditionalBottleNeck
    # MyBertSelfAttention9 / MyBertSelfAttention10
    from camtl.nn import ConditionalSelfAttention
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn as nn

from camtl import ops
from camtl.ops._checks import shape_str

__all__ = ["FiLM", "CBDA", "ConditionalLayerNorm", "ConditionalBottleNeck", "ConditionalSelfAttention",
           "MyBertSelfAttention9", "MyBertSelfAttention10", "first_row_of_task"]


def _check_input(module: str, name: str, t, layout: str, ranks, last: Optional[int], param: torch.Tensor) -> None:
    """A module input has an allowed rank, the expected last dim, and the parameters' dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{module}: '{name}' must be a tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() not in ranks:
        raise ValueError(f"{module}: '{name}' must have shape {layout}, got shape {shape_str(t.shape)}")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{module}: '{name}' must have shape {layout} with last dim {last}, "
                         f"got shape {shape_str(t.shape)}")
    if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{module}: '{name}' has dtype {t.dtype} but the module's parameters are {param.dtype}; "
                        f"cast one of them (e.g. module.to({t.dtype}))")
    if t.device != param.device:
        raise ValueError(f"{module}: '{name}' is on {t.device} but the module's parameters are on {param.device}")


def _check_task_id(module: str, task_id, batch: Optional[int]) -> None:
    """task_id is an integer (not bool: True would silently be task 1) tensor of shape [batch] ([B] if None)."""
    if not isinstance(task_id, torch.Tensor) or task_id.dtype == torch.bool or task_id.is_floating_point() \
            or task_id.is_complex():
        got = task_id.dtype if isinstance(task_id, torch.Tensor) else type(task_id).__name__
        raise TypeError(f"{module}: 'task_id' must be an integer tensor (int64 or int32) of shape [B], got {got}")
    if task_id.dim() != 1 or (batch is not None and task_id.shape[0] != batch):
        want = "[B]" if batch is None else f"[B={batch}]"
        raise ValueError(f"{module}: 'task_id' must be an integer tensor of shape {want}, "
                         f"got {shape_str(task_id.shape)}")


def first_row_of_task(task_id: torch.Tensor) -> torch.Tensor:
    """For each example, the index of the first example of the same task ([B] int64).

    The published ConditionalLayerNorm FiLMs the first ``condition`` row of each
    task; gathering through this index reproduces that without a loop or a sync.
    """
    if task_id.shape[0] == 0:  # argmax cannot reduce an empty dim
        return torch.zeros(0, dtype=torch.int64, device=task_id.device)
    same = task_id[:, None] == task_id[None, :]
    return same.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``(1 + gamma(x_cond)) * x_to_film + beta(x_cond)``.

    Args (as published):
        input_size: feature size of x_cond.
        output_size: feature size of x_to_film.
        num_film_layers: gamma and beta each have output_size * num_film_layers features.
        layer_norm: apply ``nn.LayerNorm(output_size)`` to the result.
    forward(x_cond [B, input_size], x_to_film [B, L, D] | [L, D] | [D]) -> [B, L, D] ([B, 1, D] for [D]).
    """

    def __init__(self, input_size, output_size, num_film_layers=1, layer_norm=False):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.num_film_layers = num_film_layers
        self.layer_norm = nn.LayerNorm(output_size) if layer_norm else None
        film_output_size = self.output_size * num_film_layers * 2
        self.gb_weights = nn.Linear(self.input_size, film_output_size)
        self.gb_weights.bias.data.fill_(0)

    def gamma_beta(self, x_cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """gamma, beta [B, output_size * num_film_layers] for each row of x_cond."""
        _check_input(type(self).__name__, "x_cond", x_cond, f"[B, {self.input_size}]", (2,), self.input_size,
                     self.gb_weights.weight)
        gamma, beta = self.gb_weights(x_cond).chunk(2, dim=-1)
        return gamma, beta

    def forward(self, x_cond, x_to_film, task_id=None):
        """task_id (an extension): x_cond is then one row per task [T, input_size] and example b uses row task_id[b]."""
        if task_id is not None:
            _check_task_id(type(self).__name__, task_id, None)
        gamma, beta = self.gamma_beta(x_cond)
        width = gamma.shape[-1]
        _check_input(type(self).__name__, "x_to_film", x_to_film, f"[B, L, {width}], [L, {width}] or [{width}]",
                     (1, 2, 3), width, self.gb_weights.weight)
        x = x_to_film.unsqueeze(0) if x_to_film.dim() == 1 else x_to_film
        if task_id is None and x.dim() == 3 and x.shape[0] != x_cond.shape[0]:
            raise ValueError(f"{type(self).__name__}: 'x_to_film' has batch {x.shape[0]} but 'x_cond' has "
                             f"{x_cond.shape[0]} rows; a 3-D x_to_film is [B, L, D]")
        out = ops.film(x, gamma, beta, task_id)
        if self.layer_norm is not None:
            out = self.layer_norm(out)
        return out


class CBDA(FiLM):
    """Conditional block-diagonal attention bias (the published CBDA).

    FiLM(x_cond, W) gives a table [B, L, c]; its L rows are split into
    ``blocks`` chunks of ceil(L / blocks) rows which are laid on the diagonal,
    and the result is cropped to L columns: [B, L, L].

    ``film_table`` returns the [B, L, c] table before the expansion, which is
    what the conditional attention op takes.
    """

    def __init__(self, input_size, output_size, blocks=1, num_film_layers=1, layer_norm=False):
        super().__init__(input_size, output_size, num_film_layers=num_film_layers, layer_norm=layer_norm)
        self.blocks = blocks

    def film_table(self, x_cond, x_to_film):
        """The FiLM-modulated table [rows of x_cond, L, c]: one block table per row of x_cond."""
        _check_input(type(self).__name__, "x_to_film", x_to_film, "[L, c]", (2,), None, self.gb_weights.weight)
        return super().forward(x_cond, x_to_film)

    def forward(self, x_cond, x_to_film):
        table = self.film_table(x_cond, x_to_film)
        L, c = table.shape[1], table.shape[2]
        rows_per_block = math.ceil(L / self.blocks)
        num_blocks = math.ceil(L / rows_per_block)  # torch.chunk may give fewer than `blocks`
        return ops.block_bias(table, None, L, block_rows=rows_per_block, num_cols=min(L, num_blocks * c))


class ConditionalLayerNorm(nn.Module):
    """Layer norm whose scale is FiLM-modulated by a task condition (the published module).

    weight_b = (1 + gamma(cond_b)) * weight + beta(cond_b); the bias is not conditioned.
    As published, each task uses the ``condition`` row of its first example.

    forward(input_ [B, *, D], condition [B, condition_size], task_id [B], residual=None) -> [B, *, D].
    Extensions: ``residual`` is added to input_ inside the op, LN(input_ + residual), the sum formed in
    float32 for half inputs (see camtl.ops.conditional_layer_norm);
    with ``condition_per_task=True``, condition is one row per task [T, condition_size].
    """

    __constants__ = ["normalized_shape", "condition_size", "weight", "bias", "eps"]

    def __init__(self, normalized_shape, condition_size, eps=1e-5):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"ConditionalLayerNorm: normalized_shape must be one size (the hidden size), "
                             f"got {self.normalized_shape}")
        self.condition_size = condition_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(*normalized_shape))
        self.ln_weight_modulation = FiLM(condition_size, sum(normalized_shape))
        self.bias = nn.Parameter(torch.empty(*normalized_shape))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, input_, condition, task_id, residual=None, condition_per_task=False):
        name = type(self).__name__
        D = self.normalized_shape[0]
        _check_input(name, "input_", input_, f"[B, *, {D}]", range(2, 9), D, self.weight)
        B = input_.shape[0]
        rows = "T" if condition_per_task else f"B={B}"
        _check_input(name, "condition", condition, f"[{rows}, {self.condition_size}]", (2,), self.condition_size,
                     self.weight)
        if not condition_per_task and condition.shape[0] != B:
            raise ValueError(f"{name}: 'condition' has {condition.shape[0]} rows but input_ has batch {B}")
        _check_task_id(name, task_id, B)
        gamma, beta = self.ln_weight_modulation.gamma_beta(condition)
        index = task_id if condition_per_task else first_row_of_task(task_id.to(condition.device))
        return ops.conditional_layer_norm(input_, self.weight, self.bias, gamma, beta, index, self.eps, residual)

    def extra_repr(self):
        return "{normalized_shape}, {condition_size}, eps={eps}".format(**self.__dict__)


class ConditionalBottleNeck(nn.Module):
    """FiLM then down-projection (d -> d // 3) then up-projection, no activation (as published).

    forward(x_cond [B, d], hidden_states [B, L, d]) -> [B, L, d].
    """

    def __init__(self, config):
        super().__init__()
        self.emb_transf = nn.Linear(config.hidden_size, config.hidden_size)
        self.hidden_modulation = FiLM(config.hidden_size, config.hidden_size)
        self.down_proj_layer = nn.Linear(config.hidden_size, config.hidden_size // 3)
        self.up_proj_layer = nn.Linear(config.hidden_size // 3, config.hidden_size)

    def forward(self, x_cond, hidden_states, task_id=None):
        """task_id (an extension): x_cond is then one row per task [T, d] and example b uses row task_id[b]."""
        name = type(self).__name__
        d = self.emb_transf.in_features
        weight = self.emb_transf.weight
        _check_input(name, "x_cond", x_cond, f"[B, {d}]", (2,), d, weight)
        _check_input(name, "hidden_states", hidden_states, f"[B, L, {d}]", (3,), d, weight)
        if task_id is not None:
            _check_task_id(name, task_id, hidden_states.shape[0])
        if task_id is None and hidden_states.shape[0] != x_cond.shape[0]:
            raise ValueError(f"{name}: 'hidden_states' has batch {hidden_states.shape[0]} but 'x_cond' has "
                             f"{x_cond.shape[0]} rows")
        gamma, beta = self.hidden_modulation.gamma_beta(self.emb_transf(x_cond))
        down = self.down_proj_layer
        hidden = ops.film_linear(hidden_states, gamma, beta, task_id, down.weight, down.bias)
        return self.up_proj_layer(hidden)


class ConditionalSelfAttention(nn.Module):
    """BERT self-attention with the CA-MTL conditional block-diagonal bias.

    The published ``MyBertSelfAttention9`` (base) / ``MyBertSelfAttention10``
    (large). ``config`` carries hidden_size, num_attention_heads,
    attention_probs_dropout_prob, max_seq_length and output_attentions.

    scores = q kᵀ / sqrt(d) + CBDA(task_embedding, random_weight_matrix) + attention_mask

    forward(hidden_states [B, L, D], attention_mask=None, head_mask=None,
    encoder_hidden_states=None, encoder_attention_mask=None, task_embedding [B, D])
    returns (context [B, L, D],) or (context, probs [B, H, L, L]) when
    config.output_attentions.

    ``attention_mask`` follows the mask rule of camtl.ops.conditional_attention:
    its dtype says what the values mean. A bool or integer mask is a keep-mask
    (True / 1 = attend, False / 0 = masked); a float mask is additive (added to
    the scores). Layouts: [B, L] keep-mask (e.g. a tokenizer's int64
    attention_mask); the published extended mask [B, 1, 1, L], float
    (1 - mask) * -10000 (or a bool / integer keep-mask in that layout); a float
    additive [B, 1, L, L] or [B, H, L, L]. A 2-D *float* mask is refused with a
    ValueError: a 0/1 keep-mask and a 0/-10000 additive mask cannot be told
    apart. A query whose keys are all masked by a keep-mask (or -inf) gets a
    zero context; with -10000 it attends uniformly, as published.

    L may be any batch length <= max_seq_length: the bias is cropped (dynamic padding). With
    output_attentions or a head_mask, the attention runs on the torch
    reference (the fused kernels never form the probabilities).
    """

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0 and not hasattr(config, "embedding_size"):
            raise ValueError(
                "The hidden size (%d) is not a multiple of the number of attention heads (%d)"
                % (config.hidden_size, config.num_attention_heads)
            )
        max_seq_length = getattr(config, "max_seq_length", None)
        if not isinstance(max_seq_length, numbers.Integral) or max_seq_length < 1:
            raise ValueError(f"ConditionalSelfAttention: config.max_seq_length must be a positive int, "
                             f"got {max_seq_length!r}")
        if config.hidden_size < max_seq_length:
            raise ValueError(
                f"ConditionalSelfAttention: block-diagonal attention needs hidden_size >= max_seq_length "
                f"(it uses hidden_size // max_seq_length blocks), got hidden_size={config.hidden_size}, "
                f"max_seq_length={max_seq_length}"
            )
        self.output_attentions = bool(getattr(config, "output_attentions", False))
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = int(config.hidden_size / config.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size

        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

        self.max_seq_length = max_seq_length
        self.num_blocks = config.hidden_size // self.max_seq_length
        block_width = math.ceil(self.max_seq_length / self.num_blocks)
        self.cond_block_diag_attn = CBDA(config.hidden_size, block_width, self.num_blocks)
        self.random_weight_matrix = nn.Parameter(torch.zeros([config.max_seq_length, block_width]),
                                                 requires_grad=True)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(*new_x_shape).permute(0, 2, 1, 3)

    def _key_mask(self, attention_mask, batch):
        """The mask in a form the op takes: [B, L] key padding (a keep-mask or additive), else 4-D additive."""
        if attention_mask is None:
            return None
        name = type(self).__name__
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"{name}: 'attention_mask' must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
            # [B, 1, 1, L] -> [B, L], keeping its dtype's meaning; a batch of 1 broadcasts
            mask = attention_mask.reshape(attention_mask.shape[0], -1)
            return mask.expand(batch, -1) if mask.shape[0] == 1 else mask
        if attention_mask.dim() == 2 and attention_mask.is_floating_point():
            # A float 0/1 keep-mask and a float 0/-10000 additive mask look alike: refuse to guess.
            raise ValueError(
                f"{name}: a 2-D float 'attention_mask' {shape_str(attention_mask.shape)} is ambiguous (a 0/1 "
                f"keep-mask or an additive 0/-10000 mask?); pass a bool or integer keep-mask [B, L] "
                f"(True / 1 = attend, e.g. the tokenizer's attention_mask) or the additive extended mask "
                f"[B, 1, 1, L], (1 - mask) * -10000 (the published form)"
            )
        return attention_mask

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, task_embedding=None, task_id=None, output_attentions=None,
                cu_seqlens=None, max_seqlen=None):
        """Extensions: with ``task_id`` [B], task_embedding is one row per task [T, D];
        ``output_attentions`` overrides config.output_attentions for this call.
        Packed input (``cu_seqlens`` [S+1], optional ``max_seqlen``; DESIGN.md §8): hidden_states [N, D]
        holds S sequences end to end, task_id [S] (one per sequence), no attention_mask; returns
        (context [N, D],) or (context, probs [S, H, Lmax, Lmax])."""
        output_attentions = self.output_attentions if output_attentions is None else output_attentions
        if cu_seqlens is not None or max_seqlen is not None:
            return self._forward_packed(hidden_states, attention_mask, head_mask, encoder_hidden_states,
                                        task_embedding, task_id, output_attentions, cu_seqlens, max_seqlen)
        name = type(self).__name__
        hidden = self.query.in_features
        weight = self.query.weight
        _check_input(name, "hidden_states", hidden_states, f"[B, L, {hidden}]", (3,), hidden, weight)
        B, L, _ = hidden_states.shape
        if L > self.max_seq_length:
            raise ValueError(f"{name}: the sequence length {L} of 'hidden_states' is greater than "
                             f"max_seq_length={self.max_seq_length}")
        if task_embedding is None:
            raise ValueError(f"{name}: 'task_embedding' [B, {hidden}] is required (CA-MTL attention is conditional)")
        _check_input(name, "task_embedding", task_embedding, f"[B={B}, {hidden}]", (2,), hidden, weight)
        if task_id is not None:
            _check_task_id(name, task_id, B)
        if task_id is None and task_embedding.shape[0] != B:
            raise ValueError(f"{name}: 'task_embedding' has {task_embedding.shape[0]} rows but hidden_states has "
                             f"batch {B}")
        if encoder_hidden_states is not None:  # published behaviour: only the values come from the encoder
            value_layer = self.transpose_for_scores(self.value(encoder_hidden_states))
            attention_mask = encoder_attention_mask
        else:
            value_layer = self.transpose_for_scores(self.value(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        query_layer = self.transpose_for_scores(self.query(hidden_states))

        table = self.cond_block_diag_attn.film_table(task_embedding, self.random_weight_matrix)
        result = ops.conditional_attention(
            query_layer, key_layer, value_layer, table, task_id, self._key_mask(attention_mask, B),
            dropout_p=self.dropout.p if self.training else 0.0, head_mask=head_mask,
            return_probs=output_attentions,
        )
        context, probs = result if output_attentions else (result, None)
        context = context.permute(0, 2, 1, 3).reshape(B, L, self.all_head_size)
        return (context, probs) if output_attentions else (context,)

    def _forward_packed(self, hidden_states, attention_mask, head_mask, encoder_hidden_states, task_embedding,
                        task_id, output_attentions, cu_seqlens, max_seqlen):
        """The packed path of forward: attention within each sequence of cu_seqlens."""
        name = type(self).__name__
        hidden = self.query.in_features
        weight = self.query.weight
        if cu_seqlens is None:
            raise ValueError(f"{name}: 'max_seqlen' was given without 'cu_seqlens' [S+1] (packed input needs both "
                             f"or cu_seqlens alone)")
        _check_input(name, "hidden_states", hidden_states, f"[N, {hidden}] (packed)", (2,), hidden, weight)
        if attention_mask is not None:
            raise ValueError(f"{name}: 'attention_mask' must be None with packed input (cu_seqlens): "
                             f"packed sequences have no padding")
        if encoder_hidden_states is not None:
            raise ValueError(f"{name}: 'encoder_hidden_states' is not supported with packed input (cu_seqlens)")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError(f"{name}: 'cu_seqlens' must be an int32 tensor of shape [S+1], got "
                             f"{shape_str(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens!r}")
        S = cu_seqlens.shape[0] - 1
        if task_embedding is None:
            raise ValueError(f"{name}: 'task_embedding' [S, {hidden}] is required (CA-MTL attention is conditional)")
        _check_input(name, "task_embedding", task_embedding, f"[S={S}, {hidden}]", (2,), hidden, weight)
        if task_id is not None:
            _check_task_id(name, task_id, S)
        elif task_embedding.shape[0] != S:
            raise ValueError(f"{name}: 'task_embedding' has {task_embedding.shape[0]} rows but cu_seqlens holds "
                             f"S={S} sequences")
        N = hidden_states.shape[0]
        heads = (self.num_attention_heads, self.attention_head_size)
        query, key, value = (layer(hidden_states).view(N, *heads) for layer in (self.query, self.key, self.value))
        table = self.cond_block_diag_attn.film_table(task_embedding, self.random_weight_matrix)
        result = ops.conditional_attention(
            query, key, value, table, task_id, dropout_p=self.dropout.p if self.training else 0.0,
            head_mask=head_mask, return_probs=output_attentions, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        )
        context, probs = result if output_attentions else (result, None)
        context = context.reshape(N, self.all_head_size)
        return (context, probs) if output_attentions else (context,)


MyBertSelfAttention9 = ConditionalSelfAttention
MyBertSelfAttention10 = ConditionalSelfAttention
