"""camtl.ops.film and camtl.ops.film_linear against naive float64 references written here."""

import pytest
import torch

from camtl import ops
from conftest import assert_close


def naive_film(x, gamma, beta, index):
    """Row by row: out[b, l] = (1 + gamma[index[b]]) * x[b, l] + beta[index[b]]."""
    B = index.shape[0]
    xs = x if x.dim() == 3 else x.expand(B, *x.shape)
    rows = []
    for b in range(B):
        g, be = gamma[index[b]], beta[index[b]]
        rows.append(torch.stack([(1 + g) * xs[b, l] + be for l in range(xs.shape[1])]))
    return torch.stack(rows)


def _inputs(shape_x, G, B, dtype, device):
    x = torch.randn(*shape_x, dtype=torch.float64, device=device)
    D = shape_x[-1]
    gamma, beta = torch.randn(G, D, dtype=torch.float64, device=device), torch.randn(G, D, dtype=torch.float64, device=device)
    index = torch.randint(0, G, (B,), device=device)
    index[:G] = torch.arange(G, device=device)
    ref = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    act = [t.to(dtype).clone().requires_grad_() for t in (x, gamma, beta)]
    return ref, act, index


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [False, True], ids=["per-example x", "shared x"])
def test_film_matches_naive(shared, dtype, device):
    B, L, D, G = 6, 5, 7, 3
    ref, act, index = _inputs((L, D) if shared else (B, L, D), G, B, dtype, device)
    out = ops.film(*act, index)
    exp = naive_film(*ref, index)
    assert out.shape == (B, L, D) and out.dtype == dtype
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp)
    (out.double() * grad).sum().backward()
    (exp * grad).sum().backward()
    for name, a, r in zip(("x", "gamma", "beta"), act, ref):
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")


def test_film_without_index_is_per_example(device):
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=device)
    gamma, beta = torch.randn(4, 5, dtype=torch.float64, device=device), torch.randn(4, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(ops.film(x, gamma, beta), naive_film(x, gamma, beta, torch.arange(4)), rtol=0, atol=0)


def test_film_gradcheck(device):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    gamma = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    beta = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([1, 0, 1], device=device)
    assert torch.autograd.gradcheck(lambda *a: ops.film(*a, index), (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda *a: ops.film(*a, index), (x[0].detach().requires_grad_(), gamma, beta))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_film_linear_matches_naive(with_bias, dtype, device):
    B, L, D, N, G = 5, 4, 9, 3, 2
    ref, act, index = _inputs((B, L, D), G, B, dtype, device)
    w = torch.randn(N, D, dtype=torch.float64, device=device)
    b = torch.randn(N, dtype=torch.float64, device=device) if with_bias else None
    wr, wa = w.clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    br = b.clone().requires_grad_() if with_bias else None
    ba = b.to(dtype).clone().requires_grad_() if with_bias else None
    out = ops.film_linear(*act, index, wa, ba)
    filmed = naive_film(*ref, index)
    exp = torch.einsum("bld,nd->bln", filmed, wr) + (br if with_bias else 0)
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp)
    (out.double() * grad).sum().backward()
    (exp * grad).sum().backward()
    pairs = list(zip(("x", "gamma", "beta"), act, ref)) + [("weight", wa, wr)] + ([("bias", ba, br)] if with_bias else [])
    for name, a, r in pairs:
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")


def test_film_linear_gradcheck(device):
    t = lambda *s: torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([0, 2, 2], device=device)
    assert torch.autograd.gradcheck(lambda *a: ops.film_linear(a[0], a[1], a[2], index, a[3], a[4]),
                                    (t(3, 2, 6), t(3, 6), t(3, 6), t(2, 6), t(2)))


@pytest.mark.parametrize("call,exc,words", [
    (lambda x, g, b, i: ops.film(x[0, 0], g, b, i), ValueError, ["'x'", "[B, L, D] or [L, D]", "rank 1"]),
    (lambda x, g, b, i: ops.film(x, g[:, :4], b[:, :4], i), ValueError, ["'gamma'", "expected 6", "D, the last dim of x"]),
    (lambda x, g, b, i: ops.film(x, g, b[:2], i), ValueError, ["'beta'", "shape of 'gamma'"]),
    (lambda x, g, b, i: ops.film(x, g.double(), b, i), TypeError, ["'gamma'", "float64", "float32"]),
    (lambda x, g, b, i: ops.film(x, g, b, torch.tensor([0, 1])), ValueError, ["'index'", "[B]=[3]"]),
    (lambda x, g, b, i: ops.film(x, g, b, torch.tensor([0, 1, 4])), IndexError, ["'index'", "4", "[0, 4)"]),
    (lambda x, g, b, i: ops.film(x.int(), g, b, i), TypeError, ["'x'", "torch.int32"]),
    (lambda x, g, b, i: ops.film_linear(x, g, b, i, torch.randn(2, 5)), ValueError, ["'weight'", "expected 6"]),
    (lambda x, g, b, i: ops.film_linear(x, g, b, i, torch.randn(2, 6), torch.randn(3)), ValueError, ["'bias'", "expected 2"]),
    (lambda x, g, b, i: ops.film_linear(x[0], g, b, i, torch.randn(2, 6)), ValueError, ["'x'", "[B, L, D]"]),
])
def test_bad_input(call, exc, words):
    x, g, b = torch.randn(3, 2, 6), torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(exc) as info:
        call(x, g, b, torch.tensor([0, 3, 1]))
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"
