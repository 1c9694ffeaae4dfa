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
