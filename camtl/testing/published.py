"""The published CA-MTL algorithm (CAMTL/CA-MTL, ``src/model/encoders/``), re-implemented.

These modules follow the published computation step by step, Python loops
and per-example ``torch.block_diag`` included, with the same parameter names
and initialisation order. They are the baseline that ``camtl.nn`` must equal
(tests) and beat (benchmarks). Do not use them for training.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PublishedFiLM(nn.Module):
    def __init__(self, input_size, output_size, num_film_layers=1, layer_norm=False):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.num_film_layers = num_film_layers
        self.layer_norm = nn.LayerNorm(output_size) if layer_norm else None
        self.gb_weights = nn.Linear(input_size, output_size * num_film_layers * 2)
        self.gb_weights.bias.data.fill_(0)

    def forward(self, x_cond, x_to_film):
        gamma, beta = torch.chunk(self.gb_weights(x_cond).unsqueeze(1), 2, dim=-1)
        out = (1 + gamma) * x_to_film + beta
        return out if self.layer_norm is None else self.layer_norm(out)


class PublishedCBDA(PublishedFiLM):
    def __init__(self, input_size, output_size, blocks=1, num_film_layers=1, layer_norm=False):
        super().__init__(input_size, output_size, num_film_layers, layer_norm)
        self.blocks = blocks

    def forward(self, x_cond, x_to_film):
        out = super().forward(x_cond, x_to_film)
        dense = torch.stack([torch.block_diag(*out_b.chunk(self.blocks, 0)) for out_b in out])
        return dense[:, :, : dense.size(1)]


class PublishedConditionalLayerNorm(nn.Module):
    def __init__(self, normalized_shape, condition_size, eps=1e-5):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.condition_size = condition_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(*self.normalized_shape))
        self.ln_weight_modulation = PublishedFiLM(condition_size, sum(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(*self.normalized_shape))

    def forward(self, input_, condition, task_id):
        out = torch.zeros_like(input_)
        for task in torch.unique(task_id):
            rows = task_id == task
            weight = self.ln_weight_modulation(condition[rows][0].unsqueeze(0), self.weight).view(-1)
            out[rows] = F.layer_norm(input_[rows], self.normalized_shape, weight, self.bias, self.eps)
        return out


class PublishedConditionalBottleNeck(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.emb_transf = nn.Linear(d, d)
        self.hidden_modulation = PublishedFiLM(d, d)
        self.down_proj_layer = nn.Linear(d, d // 3)
        self.up_proj_layer = nn.Linear(d // 3, d)

    def forward(self, x_cond, hidden_states):
        h = self.hidden_modulation(x_cond=self.emb_transf(x_cond), x_to_film=hidden_states)
        return self.up_proj_layer(self.down_proj_layer(h))


class PublishedSelfAttention(nn.Module):
    """MyBertSelfAttention9 / MyBertSelfAttention10 (they are the same)."""

    def __init__(self, config):
        super().__init__()
        assert config.hidden_size % config.num_attention_heads == 0
        self.output_attentions = config.output_attentions
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.max_seq_length = config.max_seq_length
        assert config.hidden_size % self.max_seq_length == 0
        self.num_blocks = config.hidden_size // self.max_seq_length
        width = math.ceil(self.max_seq_length / self.num_blocks)
        self.cond_block_diag_attn = PublishedCBDA(config.hidden_size, width, self.num_blocks)
        self.random_weight_matrix = nn.Parameter(torch.zeros([config.max_seq_length, width]), requires_grad=True)

    def _heads(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, task_embedding=None):
        if encoder_hidden_states is not None:
            value = self._heads(self.value(encoder_hidden_states))
            attention_mask = encoder_attention_mask
        else:
            value = self._heads(self.value(hidden_states))
        key = self._heads(self.key(hidden_states))
        query = self._heads(self.query(hidden_states))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        scores = scores + self.cond_block_diag_attn(x_cond=task_embedding,
                                                    x_to_film=self.random_weight_matrix).unsqueeze(1)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.Softmax(dim=-1)(scores))
        if head_mask is not None:
            probs = probs * head_mask
        context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
        context = context.view(*context.shape[:-2], self.all_head_size)
        return (context, probs) if self.output_attentions else (context,)


# ---- whole encoders ------------------------------------------------------------------------------------------

class _PublishedSublayerOutput(nn.Module):
    def __init__(self, config, in_features, conditional):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.conditional = conditional
        self.LayerNorm = (PublishedConditionalLayerNorm(config.hidden_size, config.hidden_size, eps=config.layer_norm_eps)
                          if conditional else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, input_tensor, z, task_type):
        hidden = self.dropout(self.dense(hidden))
        if self.conditional:
            return self.LayerNorm(hidden + input_tensor, z, task_type)
        return self.LayerNorm(hidden + input_tensor)


class _PublishedAttention(nn.Module):
    def __init__(self, config, conditional):
        super().__init__()
        self.self = PublishedSelfAttention(config)
        self.output = _PublishedSublayerOutput(config, config.hidden_size, conditional)

    def forward(self, hidden, mask, z, task_type):
        return self.output(self.self(hidden, mask, task_embedding=z)[0], hidden, z, task_type)


class _PublishedIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden):
        return F.gelu(self.dense(hidden))


class _PublishedLayer(nn.Module):
    def __init__(self, config, conditional):
        super().__init__()
        self.attention = _PublishedAttention(config, conditional)
        self.intermediate = _PublishedIntermediate(config)
        self.output = _PublishedSublayerOutput(config, config.intermediate_size, conditional)

    def forward(self, hidden, mask, z, task_type):
        attention_output = self.attention(hidden, mask, z, task_type)
        return self.output(self.intermediate(attention_output), attention_output, z, task_type)


class _PublishedAdapter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.bottleneck = PublishedConditionalBottleNeck(config)
        self.condlayernorm = PublishedConditionalLayerNorm(config.hidden_size, config.hidden_size,
                                                           eps=config.layer_norm_eps)

    def forward(self, bert_layer_input, hidden, z, task_type):
        return self.condlayernorm(self.bottleneck(z, hidden) + bert_layer_input, z, task_type)


class _PublishedAdapterLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.new_attention = _PublishedAttention(config, True)
        self.new_intermediate = _PublishedIntermediate(config)
        self.new_output = _PublishedSublayerOutput(config, config.intermediate_size, True)
        self.adapter = _PublishedAdapter(config)

    def forward(self, hidden, mask, z, task_type):
        attention_output = self.new_attention(hidden, mask, z, task_type)
        layer_output = self.new_output(self.new_intermediate(attention_output), attention_output, z, task_type)
        return self.adapter(attention_output, layer_output, z, task_type)


class _PublishedEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        out = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(out))


class _PublishedEncoder(nn.Module):
    def __init__(self, config, large):
        super().__init__()
        n = config.num_hidden_layers
        self.large = large
        self.task_transformation = nn.Linear(config.hidden_size, config.hidden_size)
        if large:
            plain = n // 2 + n % 2
            self.layer = nn.ModuleList([_PublishedLayer(config, False) for _ in range(plain)]
                                       + [_PublishedLayer(config, True) for _ in range(n - plain)])
            self.adapter_layer = nn.ModuleList([PublishedConditionalBottleNeck(config) for _ in range(n)])
        else:
            self.layer = nn.ModuleList([_PublishedLayer(config, False) for _ in range(n // 2)]
                                       + [_PublishedLayer(config, True) for _ in range(n // 2 - 1)]
                                       + [_PublishedAdapterLayer(config)])

    def forward(self, hidden, mask, z, task_type):
        z = self.task_transformation(z)
        hidden_film = torch.zeros_like(hidden)
        for i, layer in enumerate(self.layer):
            hidden = layer(hidden, mask, z, task_type)
            if self.large:
                hidden_film = self.adapter_layer[i](z, hidden + hidden_film)
        return hidden_film if self.large else hidden


class PublishedCaMtlEncoder(nn.Module):
    """The published CaMtlBaseEncoder (large=False) / CaMtlLargeEncoder (large=True), per-example z, loops."""

    def __init__(self, config, num_tasks, large=False):
        super().__init__()
        self.task_type_embeddings = nn.Embedding(num_tasks, config.hidden_size)
        self.conditional_alignment = PublishedFiLM(config.hidden_size, config.hidden_size)
        self.embeddings = _PublishedEmbeddings(config)
        self.encoder = _PublishedEncoder(config, large)
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids, attention_mask, token_type_ids, task_id):
        z = self.task_type_embeddings(task_id)
        mask = (1.0 - attention_mask[:, None, None, :].to(z.dtype)) * -10000.0
        hidden = self.conditional_alignment(x_cond=z, x_to_film=self.embeddings(input_ids, token_type_ids))
        sequence_output = self.encoder(hidden, mask, z, task_id)
        return sequence_output, torch.tanh(self.pooler.dense(sequence_output[:, 0]))
