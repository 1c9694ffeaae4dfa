"""Triton kernels for CA-MTL, installed as ``camtl.kernels``.

One file per op (attention, layer_norm, film, adapter), each a readable kernel
with its math in the docstring. ``IMPLEMENTED_OPS`` lists the ops this backend
runs; the registry in ``camtl.backends`` reads it.
"""

IMPLEMENTED_OPS = ()
