"""The Triton conditional flash attention (camtl.kernels.attention) against the torch backend.

On the CPU these run under TRITON_INTERPRET=1 (set by conftest.py): small shapes.
The torch backend itself is checked against a naive reference in test_ops_attention.py.
"""

import math

import pytest
import torch

import camtl
from camtl import ops
from camtl.ops.attention import _attention_fwd, draw_dropout_seed, key_bias_from_mask
from conftest import assert_close


def run(backend, leaves, index, mask=None, **kw):
    with camtl.use_backend(backend):
        return ops.conditional_attention(*leaves, index, mask, **kw)


def make(B, H, L, d, G, L_max, c, dtype, device):
    tensors = [torch.randn(B, H, L, d, device=device) for _ in range(3)] + [torch.randn(G, L_max, c, device=device)]
    index = torch.randint(0, G, (B,), device=device)
    index[: min(G, B)] = torch.arange(min(G, B), device=device)  # mixed tasks, each present
    return tensors, index


def compare_backends(tensors, index, dtype, mask=None, **kw):
    """Triton vs torch: output and the gradients of q, k, v and the table (torch in fp32 as the reference)."""
    ref = [t.float().clone().requires_grad_() for t in tensors]
    act = [t.to(dtype).clone().requires_grad_() for t in tensors]
    out = run("triton", act, index, mask, **kw)
    exp = run("torch", ref, index, mask, **kw)
    assert torch.isfinite(out).all()
    assert_close(out, exp, dtype, "output")
    grad = torch.randn_like(exp)
    out.backward(grad.to(dtype))
    exp.backward(grad)
    for name, a, r in zip(("q", "k", "v", "table"), act, ref):
        assert a.grad.dtype == dtype
        assert_close(a.grad, r.grad, dtype, f"grad of {name}")
    return out


@pytest.mark.parametrize("d", [32, 64, 128])
def test_head_dims(d, device):
    tensors, index = make(2, 2, 19, d, 3, 24, 7, torch.float32, device)
    compare_backends(tensors, index, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,L_max,c", [(32, 32, 11), (23, 23, 8), (17, 40, 14)],
                         ids=["L=32 c=11", "odd L=23, last block cropped", "dynamic L=17 of 40"])
def test_mixed_tasks_odd_and_dynamic_lengths(L, L_max, c, dtype, device):
    tensors, index = make(3, 2, L, 32, 2, L_max, c, dtype, device)
    compare_backends(tensors, index, dtype)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_padding(kind, device):
    B, L = 3, 21
    tensors, index = make(B, 2, L, 32, 2, 24, 6, torch.float32, device)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([21, 9, 1], device=device)[:, None]
    mask = keep if kind == "bool" else (1.0 - keep.float()) * -10000.0
    compare_backends(tensors, index, torch.float32, mask)


def test_fully_masked_example_gives_zeros(device):
    B, L = 2, 18
    tensors, index = make(B, 2, L, 32, 2, 18, 6, torch.float32, device)
    keep = torch.ones(B, L, dtype=torch.bool, device=device)
    keep[1] = False
    out = compare_backends(tensors, index, torch.float32, keep)
    assert (out[1] == 0).all()


def test_strided_views_of_one_qkv_projection(device):
    B, L, H, d = 2, 20, 2, 32
    qkv = torch.randn(B, L, 3 * H * d, device=device, requires_grad=True)
    table = torch.randn(B, L, 5, device=device, requires_grad=True)

    def attention(backend):
        q, k, v = (t.view(B, L, H, d).permute(0, 2, 1, 3) for t in qkv.split(H * d, dim=-1))
        assert not q.is_contiguous()
        with camtl.use_backend(backend):
            return ops.conditional_attention(q, k, v, table)

    out = attention("triton")
    grads = torch.autograd.grad(out.sum(), (qkv, table))
    exp = attention("torch")
    exp_grads = torch.autograd.grad(exp.sum(), (qkv, table))
    assert_close(out, exp, torch.float32)
    for g, e in zip(grads, exp_grads):
        assert_close(g, e, torch.float32)


def test_backward_is_deterministic(device):
    tensors, index = make(4, 3, 22, 32, 2, 24, 8, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in tensors]

    def grads():
        out = run("triton", leaves, index)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


# ---- dropout ------------------------------------------------------------------------------------------------

def _dropped_probs(q, k, table, index, p, seed):
    """With v = I (padded to d), out[..., :L] is exactly the dropped, rescaled probabilities."""
    B, H, L, d = q.shape
    eye = torch.zeros(B, H, L, d, device=q.device)
    eye[..., :L] = torch.eye(L, device=q.device)
    torch.manual_seed(seed)
    return run("triton", [q, k, eye, table], index, dropout_p=p)[..., :L]


def test_dropout_keep_rate_and_rescale(device):
    B, H, L, d, p = 2, 4, 32, 32, 0.3
    (q, k, _, table), index = make(B, H, L, d, 2, 32, 11, torch.float32, device)
    dropped = _dropped_probs(q, k, table, index, p, seed=3)
    probs = run("torch", [q, k, q, table], index, return_probs=True)[1]
    kept = dropped != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel()), f"keep rate {rate}"
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-6)


def test_dropout_same_seed_same_output_and_backward_uses_the_forward_mask(device):
    B, H, L, d, p = 2, 2, 20, 32, 0.25
    (q, k, v, table), index = make(B, H, L, d, 2, 24, 7, torch.float32, device)
    keep = _dropped_probs(q, k, table, index, p, seed=11) != 0  # the mask depends on the seed only

    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    torch.manual_seed(11)
    out = run("triton", leaves, index, dropout_p=p)
    torch.manual_seed(11)
    assert torch.equal(out, run("triton", leaves, index, dropout_p=p))
    torch.manual_seed(12)
    assert not torch.equal(out, run("triton", leaves, index, dropout_p=p))

    # Reference with the exposed mask, in float64.
    ref = [t.double().clone().requires_grad_() for t in (q, k, v, table)]
    _, probs = ops.conditional_attention(*ref[:3], ref[3], index, return_probs=True)
    exp = (probs * keep / (1 - p)) @ ref[2]
    assert_close(out, exp, torch.float32, "output")
    grad = torch.randn_like(exp)
    out.backward(grad.float())
    exp.backward(grad)
    for name, a, r in zip(("q", "k", "v", "table"), leaves, ref):
        assert_close(a.grad, r.grad, torch.float32, f"grad of {name} with dropout")


# ---- registration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, device):
    B, H, L, d = 2, 2, 16, 32
    q, k, v = (torch.randn(B, H, L, d, device=device, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 20, 6, device=device, requires_grad=True)
    keep = torch.arange(L, device=device)[None, :] < torch.tensor([16, 7], device=device)[:, None]
    kb = key_bias_from_mask(keep, q) if masked else None
    args = (q, k, v, table, torch.tensor([1, 0], device=device), kb, 0.2, 0.0, draw_dropout_seed(0.0))
    torch.library.opcheck(_attention_fwd, args)


def test_torch_compile_fullgraph(device):
    cfg = dict(hidden_size=64, num_attention_heads=2, max_seq_length=32)
    from conftest import bert_config

    module = camtl.nn.ConditionalSelfAttention(bert_config(**cfg)).to(device)
    with torch.no_grad():
        module.random_weight_matrix.normal_()
    h = torch.randn(2, 24, 64, device=device, requires_grad=True)
    z = torch.randn(2, 64, device=device)
    keep = torch.ones(2, 24, dtype=torch.bool, device=device)
    keep[1, 10:] = False
    with camtl.use_backend("triton"):
        eager = module(h, keep, task_embedding=z)[0]
        compiled = torch.compile(lambda *a: module(*a, task_embedding=z)[0], fullgraph=True, backend="aot_eager")
        out = compiled(h, keep)
    assert_close(out, eager, torch.float32)
    g_eager, = torch.autograd.grad(eager.sum(), h)
    g_out, = torch.autograd.grad(out.sum(), h)
    assert_close(g_out, g_eager, torch.float32)


def test_module_uses_the_kernel_and_the_reference_for_probabilities(device):
    from conftest import bert_config

    module = camtl.nn.ConditionalSelfAttention(bert_config(hidden_size=64, num_attention_heads=2,
                                                           max_seq_length=32, output_attentions=True)).to(device)
    h, z = torch.randn(2, 20, 64, device=device), torch.randn(2, 64, device=device)
    with camtl.use_backend("triton"):
        ctx, probs = module(h, task_embedding=z)
    module.output_attentions = False
    with camtl.use_backend("triton"):
        (ctx_kernel,) = module(h, task_embedding=z)
    assert probs.shape == (2, 2, 20, 20)
    assert_close(ctx_kernel, ctx, torch.float32)


@pytest.mark.parametrize("B,L", [(0, 8), (2, 0)], ids=["no example", "no token"])
def test_empty_inputs(B, L, device):
    q = torch.randn(B, 2, L, 32, device=device, requires_grad=True)
    table = torch.randn(2, 8, 3, device=device, requires_grad=True)
    out = run("triton", [q, q, q, table], torch.zeros(B, dtype=torch.long, device=device))
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
    assert (table.grad == 0).all()


def test_long_sequence(device):
    """L >= 512 (BERT's longest), not a multiple of the tile, with the large model's wide blocks (c = 256)."""
    tensors, index = make(1, 1, 515, 32, 2, 520, 256, torch.float32, device)
    keep = torch.ones(1, 515, dtype=torch.bool, device=device)
    keep[0, 400:] = False
    compare_backends(tensors, index, torch.float32, keep)
