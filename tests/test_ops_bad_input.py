"""Issue 13: one mask rule, one overflow / degenerate-input rule on every backend, clear errors.

The triton backend runs under the interpreter on CPU tensors (tests/conftest.py): small shapes.
"""

import pytest
import torch

import camtl
from camtl import ops
from conftest import assert_close

BACKENDS = ("torch", "triton")


def _raises(exc, words, fn):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


def _run(backend, fn, tensors, grad=None):
    """fn(*leaves) on backend; backward(grad) if given. Returns (out, grads of the leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with camtl.use_backend(backend):
        out = fn(*leaves)
    if grad is None:
        grad = torch.randn(out.shape, device=out.device).to(out.dtype)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


def _attention_inputs(device, B=3, H=2, L=10, d=8, G=2, c=4, dtype=torch.float32, scale=1.0):
    q, k, v = (torch.randn(B, H, L, d, device=device, dtype=dtype) * scale for _ in range(3))
    table = torch.randn(G, L, c, device=device, dtype=dtype)
    index = torch.randint(0, G, (B,), device=device)
    return [q, k, v, table], index


# ---- 1. the mask rule: bool / integer = keep-mask, float = additive ---------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_masks_and_additive_masks_agree(backend, device):
    tensors, index = _attention_inputs(device)
    B, L = 3, 10
    keep = torch.rand(B, L, device=device) > 0.4
    keep[:, 0] = True
    keep[1, 5:] = False
    additive_inf = torch.zeros(B, L, device=device).masked_fill(~keep, float("-inf"))
    additive_published = (1.0 - keep.float()) * -10000.0
    grad = torch.randn(B, 2, L, 8, device=device)
    attend = lambda mask: (lambda q, k, v, t: ops.conditional_attention(q, k, v, t, index, mask))
    out, grads = _run(backend, attend(keep), tensors, grad)
    for name, mask in [("int64 keep-mask", keep.long()), ("int32 keep-mask", keep.int()),
                       ("additive -inf", additive_inf), ("additive -10000", additive_published)]:
        got, got_grads = _run(backend, attend(mask), tensors, grad)
        assert_close(got, out, torch.float32, name)
        for g, e in zip(got_grads, grads):
            assert_close(g, e, torch.float32, f"{name}: grads")
    # The published [B, 1, 1, L] additive layout (the torch reference takes 4-D masks).
    got, _ = _run("torch", attend(additive_published[:, None, None, :]), tensors, grad)
    assert_close(got, out, torch.float32, "4-D additive")


def test_integer_keep_mask_is_not_read_as_additive(device):
    """Before the rule, an int 0/1 mask was refused by the op; 1 must mean attend, never +1 on the score."""
    tensors, index = _attention_inputs(device, B=2, L=6)
    keep = torch.ones(2, 6, dtype=torch.long, device=device)
    keep[0, 3:] = 0
    got = ops.conditional_attention(*tensors, index, keep)
    exp = ops.conditional_attention(*tensors, index, keep.bool())
    torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("mask,words", [
    (lambda B, L: torch.ones(B, 1, 1, L, dtype=torch.bool), ["'attn_mask'", "keep-mask", "torch.bool [3, 1, 1, 10]"]),
    (lambda B, L: torch.ones(B, L, dtype=torch.complex64), ["'attn_mask'", "complex64"]),
    (lambda B, L: torch.ones(B, L, 1), ["'attn_mask'", "[B, L]=[3, 10]", "[3, 10, 1]"]),
], ids=["4-D bool", "complex", "3-D"])
def test_bad_masks_are_refused(mask, words, device):
    tensors, index = _attention_inputs(device)
    exc = TypeError if "complex64" in words else ValueError
    _raises(exc, words, lambda: ops.conditional_attention(*tensors, index, mask(3, 10).to(device)))


# ---- 2. overflow and degenerate inputs: fp32 intermediates, all-masked rows give zeros ---------------------------

def _fp64_on_rounded(fn, tensors, grad):
    """fn on the fp16-rounded inputs in float64 (no overflow anywhere): the value every backend must approach."""
    return _run("torch", fn, [t.double() for t in tensors], grad.double())


def _finite_and_equal_to_fp64_on_every_backend(fn, tensors, grad, names):
    """fn's fp16 output and gradients, on each backend: finite, and close to fp64 on the same rounded inputs."""
    exp, exp_grads = _fp64_on_rounded(fn, tensors, grad)
    for backend in BACKENDS:
        out, grads = _run(backend, fn, tensors, grad)
        assert torch.isfinite(out).all(), backend
        assert_close(out, exp, torch.float16, f"{backend}: output")
        for name, g, e in zip(names.split(), grads, exp_grads):
            assert torch.isfinite(g).all(), f"{backend}: grad of {name}"
            assert_close(g, e, torch.float16, f"{backend}: grad of {name}")


def test_fp16_scores_above_65504_agree_and_are_finite(device):
    # |q·k| reaches ~1e5 > 65504 (the fp16 max): the scores must be formed in fp32.
    tensors, index = _attention_inputs(device, B=2, H=1, L=8, d=16, c=4, dtype=torch.float16, scale=100.0)
    q, k = tensors[:2]
    q[:, :, :3] = k[:, :, :3]  # q_i·k_i = |k_i|² ≈ 1.6e5 on these rows
    tensors[2] = tensors[2] / 100  # v of unit size: only the scores are large
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    fn = lambda q, k, v, t: ops.conditional_attention(q, k, v, t, index, scale=1e-4)
    grad = torch.randn(2, 1, 8, 16, device=device).half()
    _finite_and_equal_to_fp64_on_every_backend(fn, tensors, grad, "q k v table")


def test_fp16_residual_sum_beyond_65504_is_normalized(device):
    B, L, D, G = 3, 4, 16, 2
    x = (4e4 + 1e3 * torch.randn(B, L, D, device=device)).half()
    residual = (4e4 + 1e3 * torch.randn(B, L, D, device=device)).half()
    assert torch.isinf(x + residual).any()  # the fp16 sum overflows
    weight, bias = 1 + 0.1 * torch.randn(D, device=device), torch.randn(D, device=device)
    gamma, beta = 0.5 * torch.randn(G, D, device=device), 0.5 * torch.randn(G, D, device=device)
    tensors = [x, residual] + [t.half() for t in (weight, bias, gamma, beta)]
    index = torch.tensor([1, 0, 1], device=device)
    fn = lambda x, r, w, b, g, be: ops.conditional_layer_norm(x, w, b, g, be, index, 1e-5, r)
    grad = torch.randn(B, L, D, device=device).half()
    _finite_and_equal_to_fp64_on_every_backend(fn, tensors, grad, "x residual weight bias gamma beta")


def test_fp16_film_intermediate_beyond_65504_agrees(device):
    # (1 + gamma) * x = 7e4 overflows fp16, the output 7e4 - 1e4 = 6e4 does not.
    x = torch.full((2, 3, 4), 3.5e4, device=device).half()
    gamma = torch.ones(1, 4, device=device).half()
    beta = torch.full((1, 4), -1e4, device=device).half()
    index = torch.zeros(2, dtype=torch.long, device=device)
    for backend in BACKENDS:
        with camtl.use_backend(backend):
            out = ops.film(x, gamma, beta, index)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out, torch.full_like(out, 6e4), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_masked_rows_give_zeros_and_zero_grads_on_every_backend(dtype, device):
    """A float key mask that is -inf on every key of an example (and a bool one): zeros, not NaN, both backends."""
    tensors, index = _attention_inputs(device, B=3, L=9, dtype=dtype)
    additive = torch.zeros(3, 9, device=device)
    additive[0, 6:] = float("-inf")
    additive[1] = float("-inf")  # example 1 has no key left
    grad = torch.randn(3, 2, 9, 8, device=device).to(dtype)
    results = {}
    for backend in BACKENDS:
        for kind, mask in [("float", additive.to(dtype)), ("bool", additive == 0)]:
            fn = lambda q, k, v, t: ops.conditional_attention(q, k, v, t, index, mask)
            out, grads = _run(backend, fn, tensors, grad)
            assert torch.isfinite(out).all(), (backend, kind)
            assert (out[1] == 0).all(), (backend, kind)
            for name, g in zip("q k v".split(), grads):
                assert torch.isfinite(g).all() and (g[1] == 0).all(), (backend, kind, name)
            assert torch.isfinite(grads[3]).all(), (backend, kind, "table")
            results[backend, kind] = (out, grads)
    ref_out, ref_grads = results["torch", "bool"]
    for key, (out, grads) in results.items():
        assert_close(out, ref_out, dtype, f"{key}: output")
        for name, g, e in zip("q k v table".split(), grads, ref_grads):
            assert_close(g, e, dtype, f"{key}: grad of {name}")


def test_4d_mask_with_fully_masked_query_rows(device):
    """A 4-D additive mask (torch reference) that leaves some query rows no key: those rows are zero."""
    tensors, index = _attention_inputs(device, B=2, L=6, dtype=torch.float64)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64, device=device)
    mask[0, 0, 2] = float("-inf")  # query row 2 of example 0
    fn = lambda q, k, v, t: ops.conditional_attention(q, k, v, t, index, mask)
    out, grads = _run("torch", fn, tensors)
    assert torch.isfinite(out).all() and (out[0, :, 2] == 0).all()
    assert (out[0, :, 3] != 0).any()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0, :, 2] == 0).all(), "no gradient reaches a fully masked query"


# ---- 3. clear errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,L", [(0, 5), (2, 0)], ids=["B=0", "L=0"])
def test_empty_batch_or_length_gives_empty_results(backend, B, L, device):
    r = lambda *s: torch.randn(*s, device=device)
    index = torch.zeros(B, dtype=torch.long, device=device)
    D, G = 6, 2
    cases = [
        ("conditional_attention", lambda q, k, v, t: ops.conditional_attention(q, k, v, t, index),
         [r(B, 2, L, 4), r(B, 2, L, 4), r(B, 2, L, 4), r(G, 5, 3)]),
        ("conditional_layer_norm", lambda x, w, b, g, be: ops.conditional_layer_norm(x, w, b, g, be, index),
         [r(B, L, D), r(D), r(D), r(G, D), r(G, D)]),
        ("film", lambda x, g, be: ops.film(x, g, be, index), [r(B, L, D), r(G, D), r(G, D)]),
        ("film_linear", lambda x, g, be, w, b: ops.film_linear(x, g, be, index, w, b),
         [r(B, L, D), r(G, D), r(G, D), r(3, D), r(3)]),
    ]
    for name, fn, tensors in cases:
        with camtl.use_backend("torch"), torch.no_grad():
            shape = fn(*tensors).shape
        assert 0 in shape, name
        out, grads = _run(backend, fn, tensors, torch.zeros(shape, device=device))
        assert out.shape == shape, name
        for t, g in zip(tensors, grads):
            assert g.shape == t.shape and (g == 0).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_without_index_and_empty_table(backend, device):
    """B = 0 with index=None: the table has G = B = 0 rows; the per-task sums of the kernels' backward are empty."""
    r = lambda *s: torch.randn(*s, device=device)
    cases = [
        (lambda q, k, v, t: ops.conditional_attention(q, k, v, t), [r(0, 2, 5, 4), r(0, 2, 5, 4), r(0, 2, 5, 4),
                                                                    r(0, 5, 3)]),
        (lambda x, w, b, g, be: ops.conditional_layer_norm(x, w, b, g, be), [r(0, 3, 6), r(6), r(6), r(0, 6), r(0, 6)]),
        (lambda x, g, be: ops.film(x, g, be), [r(0, 3, 6), r(0, 6), r(0, 6)]),
        (lambda x, g, be, w: ops.film_linear(x, g, be, None, w), [r(0, 3, 6), r(0, 6), r(0, 6), r(4, 6)]),
    ]
    for fn, tensors in cases:
        out, grads = _run(backend, fn, tensors)
        assert out.numel() == 0
        for t, g in zip(tensors, grads):
            assert g.shape == t.shape and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_dims_are_refused(backend, device):
    r = lambda *s: torch.randn(*s, device=device)
    index = torch.tensor([0, 1], device=device)
    with camtl.use_backend(backend):
        _raises(ValueError, ["'q'", "head dim d >= 1", "[2, 2, 4, 0]"],
                lambda: ops.conditional_attention(r(2, 2, 4, 0), r(2, 2, 4, 0), r(2, 2, 4, 0), r(2, 4, 2), index))
        _raises(ValueError, ["'x'", "D >= 1", "[2, 3, 0]"],
                lambda: ops.conditional_layer_norm(r(2, 3, 0), r(0), r(0), r(2, 0), r(2, 0), index))
        _raises(ValueError, ["'x'", "D >= 1", "[2, 3, 0]"], lambda: ops.film(r(2, 3, 0), r(2, 0), r(2, 0), index))
        _raises(ValueError, ["'x'", "D >= 1", "[2, 3, 0]"],
                lambda: ops.film_linear(r(2, 3, 0), r(2, 0), r(2, 0), index, r(4, 0)))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(seq_len=-1), ValueError, ["'seq_len'", ">= 0", "-1"]),
    (dict(seq_len=2.5), TypeError, ["'seq_len'", "int", "2.5"]),
    (dict(seq_len=True), TypeError, ["'seq_len'", "bool"]),
    (dict(num_cols=-2), ValueError, ["'num_cols'", ">= 0", "-2"]),
    (dict(block_rows=0), ValueError, ["'block_rows'", ">= 1"]),
])
def test_block_bias_bad_sizes(kwargs, exc, words, device):
    table = torch.randn(2, 6, 3, device=device)
    _raises(exc, words, lambda: ops.block_bias(table, None, **kwargs))


def test_block_bias_zero_length_is_empty(device):
    assert ops.block_bias(torch.randn(2, 6, 3, device=device), None, 0).shape == (2, 0, 0)


def test_bool_index_is_refused_by_every_op(device):
    r = lambda *s: torch.randn(*s, device=device)
    index = torch.tensor([True, False], device=device)
    calls = [
        lambda: ops.conditional_attention(r(2, 1, 4, 4), r(2, 1, 4, 4), r(2, 1, 4, 4), r(2, 4, 2), index),
        lambda: ops.conditional_layer_norm(r(2, 3, 4), r(4), r(4), r(2, 4), r(2, 4), index),
        lambda: ops.film(r(2, 3, 4), r(2, 4), r(2, 4), index),
        lambda: ops.film_linear(r(2, 3, 4), r(2, 4), r(2, 4), index, r(3, 4)),
        lambda: ops.block_bias(r(2, 4, 2), index),
    ]
    for call in calls:
        _raises(TypeError, ["'index'", "int64", "torch.bool"], call)


def _double_backward_cases(device):
    r = lambda *s: torch.randn(*s, device=device)
    index = torch.tensor([1, 0], device=device)
    return [
        ("camtl.ops.conditional_attention", lambda q, k, v, t: ops.conditional_attention(q, k, v, t, index),
         [r(2, 1, 5, 4), r(2, 1, 5, 4), r(2, 1, 5, 4), r(2, 5, 2)]),
        ("camtl.ops.conditional_layer_norm", lambda x, w, b, g, be: ops.conditional_layer_norm(x, w, b, g, be, index),
         [r(2, 3, 4), r(4), r(4), r(2, 4), r(2, 4)]),
        ("camtl.ops.film", lambda x, g, be: ops.film(x, g, be, index), [r(2, 3, 4), r(2, 4), r(2, 4)]),
        ("camtl.ops.film_linear", lambda x, g, be, w: ops.film_linear(x, g, be, index, w),
         [r(2, 3, 4), r(2, 4), r(2, 4), r(3, 4)]),
    ]


def _gradient_penalty(backend, fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    with camtl.use_backend(backend):
        out = fn(*leaves)
        grads = torch.autograd.grad((out * out).sum(), leaves, create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
    return leaves


def test_double_backward_on_triton_says_use_torch(device):
    for op, fn, tensors in _double_backward_cases(device):
        _raises(RuntimeError, [op, "double backward", "torch backend only", "use_backend('torch')"],
                lambda: _gradient_penalty("triton", fn, tensors))
        leaves = _gradient_penalty("torch", fn, tensors)  # the documented way works
        assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves), op
