"""Triton kernels for CA-MTL, installed as ``camtl.kernels``.

One file per op (attention, layer_norm, film, adapter), each a readable kernel
with its math in the docstring. The kernels are launched by plain functions;
``camtl.ops`` registers them as torch.library ops with autograd and declares
them to the backend registry.
"""
