"""camtl.ops.conditional_layer_norm against a naive float64 reference written here."""

import pytest
import torch

from camtl import ops
from conftest import assert_close


def naive_cln(x, weight, bias, gamma, beta, index, eps, residual=None):
    """Per example: scale from its task's FiLM row, then textbook layer norm."""
    h = x if residual is None else x + residual
    out = []
    for b in range(x.shape[0]):
        scale = (1 + gamma[index[b]]) * weight + beta[index[b]]
        hb = h[b]
        mean = hb.mean(-1, keepdim=True)
        var = ((hb - mean) ** 2).mean(-1, keepdim=True)
        out.append((hb - mean) / torch.sqrt(var + eps) * scale + bias)
    return torch.stack(out)


def _inputs(x_shape, G, dtype, device, residual):
    D, B = x_shape[-1], x_shape[0]
    r = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)
    tensors = [r(*x_shape) * 3 + 1, 1 + 0.1 * r(D), r(D), r(G, D) * 0.5, r(G, D) * 0.5]
    if residual:
        tensors.append(r(*x_shape))
    index = torch.randint(0, G, (B,), device=device)
    index[:G] = torch.arange(G, device=device)
    ref = [t.clone().requires_grad_() for t in tensors]
    act = [t.to(dtype).clone().requires_grad_() for t in tensors]
    return ref, act, index


NAMES = ("x", "weight", "bias", "gamma", "beta", "residual")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused residual"])
@pytest.mark.parametrize("x_shape", [(6, 5, 16), (4, 37), (3, 2, 2, 10)], ids=["B,L,D", "B,D odd", "B,*,D"])
def test_matches_naive(x_shape, residual, dtype, device):
    ref, act, index = _inputs(x_shape, 3, dtype, device, residual)
    eps = 1e-5
    split = lambda ts: (ts[:5], ts[5] if residual else None)
    (a5, ares), (r5, rres) = split(act), split(ref)
    out = ops.conditional_layer_norm(*a5, index, eps, ares)
    exp = naive_cln(*r5, index, eps, rres)
    assert out.shape == x_shape and out.dtype == dtype
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp)
    (out.double() * grad).sum().backward()
    (exp * grad).sum().backward()
    for name, a, r in zip(NAMES, act, ref):
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")


def test_absent_task_gets_zero_gamma_grad(device):
    ref, act, index = _inputs((5, 3, 8), 4, torch.float64, device, False)
    index = torch.tensor([0, 2, 2, 0, 2], device=device)  # tasks 1 and 3 absent
    ops.conditional_layer_norm(*act, index).pow(2).sum().backward()
    gamma, beta = act[3], act[4]
    for t in (1, 3):
        assert (gamma.grad[t] == 0).all() and (beta.grad[t] == 0).all()
    assert (gamma.grad[0] != 0).any() and (gamma.grad[2] != 0).any()


def test_gradcheck(device):
    ref, _, index = _inputs((3, 2, 6), 2, torch.float64, device, True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, g, be, res: ops.conditional_layer_norm(x, w, b, g, be, index, 1e-5, res), tuple(ref))


@pytest.mark.parametrize("change,exc,words", [
    (dict(x=torch.randn(8)), ValueError, ["'x'", "[B, *, D]", "rank 1"]),
    (dict(weight=torch.randn(7)), ValueError, ["'weight'", "expected 8"]),
    (dict(gamma=torch.randn(3, 7)), ValueError, ["'gamma'", "expected 8"]),
    (dict(beta=torch.randn(2, 8)), ValueError, ["'beta'", "shape of 'gamma'"]),
    (dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, ["'bias'", "float64"]),
    (dict(residual=torch.randn(2, 5, 8)), ValueError, ["'residual'", "[2, 4, 8]"]),
    (dict(index=torch.tensor([0, 3])), IndexError, ["'index'", "[0, 3)"]),
    (dict(eps=0.0), ValueError, ["'eps'", "> 0"]),
])
def test_bad_input(change, exc, words):
    args = dict(x=torch.randn(2, 4, 8), weight=torch.randn(8), bias=torch.randn(8), gamma=torch.randn(3, 8),
                beta=torch.randn(3, 8), index=torch.tensor([0, 2]), eps=1e-5, residual=None)
    args.update(change)
    with pytest.raises(exc) as info:
        ops.conditional_layer_norm(**args)
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


def test_opcheck_multi_tile(device):
    """The registered kernel op over many row tiles and several backward chunks per example, fused residual."""
    from camtl.kernels.layer_norm import _config
    from camtl.ops.layer_norm import _cln_fwd

    _, act, _ = _inputs((2, 11, 20), 2, torch.float32, device, True)
    x, weight, bias, gamma, beta, residual = act
    assert 11 > 2 * _config(20)["BLOCK_M"], "each example's rows must span more than two tiles"
    torch.library.opcheck(_cln_fwd, (x, weight, bias, gamma, beta, torch.tensor([1, 0], device=device), residual,
                                     1e-5))
