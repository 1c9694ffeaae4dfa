"""Functional, autograd-capable CA-MTL ops.

Each op checks its inputs (errors name the argument and the expected shape,
dtype or range), then runs on the backend chosen by ``camtl.use_backend`` /
``CAMTL_BACKEND`` (see ``camtl.backends``). The math of each op is in its
module's docstring.
"""

from camtl.ops._checks import index_read_once
from camtl.ops.adapter import film_linear
from camtl.ops.attention import block_bias, conditional_attention
from camtl.ops.film import film
from camtl.ops.layer_norm import conditional_layer_norm

OP_NAMES = ("film", "block_bias", "conditional_attention", "conditional_layer_norm", "film_linear")

__all__ = ["film", "block_bias", "conditional_attention", "conditional_layer_norm", "film_linear", "OP_NAMES",
           "index_read_once"]
