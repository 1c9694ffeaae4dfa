"""Functional, autograd-capable CA-MTL ops.

Each op checks its inputs (errors name the argument and the expected shape,
dtype or range), then runs on the backend chosen by ``camtl.use_backend`` /
``CAMTL_BACKEND`` (see ``camtl.backends``). The math of each op is in its
module's docstring.

Rules every backend follows (each op's docstring gives its part):
- float16 / bfloat16 inputs: intermediates (FiLM, attention scores and
  softmax, the residual sum, layer-norm statistics) run in float32; only the
  outputs are rounded to the input dtype (an output past its range is ±inf);
- masks: bool / integer = keep-mask (True / 1 = attend), float = additive; a
  query whose keys are all masked outputs zeros with zero gradients;
- empty batches or lengths give empty results; zero feature dims are refused;
- task indices are int64 / int32 tensors (bool is refused);
- double backward runs on the torch backend only (the kernels raise a clear error).
Inputs are not checked for NaN / inf (that would need a host sync per call).

Packed (padding-free) input, S sequences end to end, N tokens in all
(DESIGN.md §8): the token-wise ops take a per-token task index
``token_index = index.repeat_interleave(lengths)`` [N] and treat each token as
one example:
- conditional_layer_norm(x [N, D], ..., token_index) directly;
- film and film_linear on the view ``x.unsqueeze(1)`` [N, 1, D] (a 2-D x is
  film's shared [L, D] form, not a packed one), output [N, 1, ·];
- conditional_attention(q, k, v [N, H, d], table, index [S],
  cu_seqlens=cu_seqlens) needs the boundaries (torch backend for now).
"""

from camtl.ops._checks import index_read_once
from camtl.ops.adapter import film_linear
from camtl.ops.attention import block_bias, conditional_attention
from camtl.ops.film import film
from camtl.ops.layer_norm import conditional_layer_norm

OP_NAMES = ("film", "block_bias", "conditional_attention", "conditional_layer_norm", "film_linear")

__all__ = ["film", "block_bias", "conditional_attention", "conditional_layer_norm", "film_linear", "OP_NAMES",
           "index_read_once"]
