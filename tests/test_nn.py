"""camtl.nn modules against the published algorithm (camtl.testing.published), state dicts loaded strict.

The published re-implementation keeps the published loops and per-example
block_diag; camtl.nn must give the same outputs and gradients (1e-12 in fp64).
"""

import copy

import pytest
import torch

import camtl
import camtl.nn as cnn
from camtl.testing import published as pub
from conftest import assert_close, bert_config, graph_has


def randomize_(module):
    """Published inits are partly zeros (CBDA matrix, FiLM biases): draw every parameter afresh."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def twin(pub_cls, ours_cls, *args, **kwargs):
    """The published module with random parameters, and ours loaded from its state dict (strict)."""
    torch.manual_seed(0)
    theirs = pub_cls(*args, **kwargs).double()
    torch.manual_seed(0)
    ours = ours_cls(*args, **kwargs).double()
    # Same constructor, same RNG: the same initialisation.
    for (n1, p1), (n2, p2) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=f"init of {n1}")
    randomize_(theirs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def assert_same(theirs, ours, inputs, call=lambda m, *a: m(*a), out_index=None, tol=1e-12):
    """Same outputs, input gradients and parameter gradients."""
    ins_t = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    ins_o = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out_t, out_o = call(theirs, *ins_t), call(ours, *ins_o)
    if out_index is not None:
        out_t, out_o = out_t[out_index], out_o[out_index]
    assert out_t.shape == out_o.shape
    torch.testing.assert_close(out_o, out_t, rtol=tol, atol=tol, msg="output")
    grad = torch.randn_like(out_t)
    (out_t * grad).sum().backward()
    (out_o * grad).sum().backward()
    for i, (a, b) in enumerate(zip(ins_t, ins_o)):
        if a.is_floating_point():
            torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol, msg=f"grad of input {i}")
    for (name, p_t), p_o in zip(theirs.named_parameters(), ours.parameters()):
        if p_t.grad is None:
            assert p_o.grad is None or (p_o.grad == 0).all(), name
        else:
            torch.testing.assert_close(p_o.grad, p_t.grad, rtol=tol, atol=tol, msg=f"grad of {name}")


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ---- FiLM and CBDA -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(5, 7, 6), (7, 6), (6,)], ids=["[B,L,D]", "[L,D]", "[D]"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_film(x_shape, layer_norm):
    theirs, ours = twin(pub.PublishedFiLM, cnn.FiLM, 4, 6, layer_norm=layer_norm)
    assert_same(theirs, ours, [f64(5, 4), f64(*x_shape)])


@pytest.mark.parametrize("L,c,blocks", [(12, 4, 3), (10, 4, 3), (10, 3, 2), (7, 7, 1)],
                         ids=["square", "last block cropped", "wide chunks, c != rows", "one block"])
def test_cbda(L, c, blocks):
    theirs, ours = twin(pub.PublishedCBDA, cnn.CBDA, 8, c, blocks)
    assert_same(theirs, ours, [f64(4, 8), f64(L, c)])


# ---- Conditional layer norm ---------------------------------------------------------------------------------

def test_conditional_layer_norm_mixed_tasks():
    theirs, ours = twin(pub.PublishedConditionalLayerNorm, cnn.ConditionalLayerNorm, 10, 6, eps=1e-7)
    task_id = torch.tensor([3, 1, 3, 0, 1, 3])
    # Rows of one task differ here: both use the first row of each task.
    assert_same(theirs, ours, [f64(6, 5, 10) * 2, f64(6, 6), task_id])


def naive_conditional_layer_norm(module, x, residual, condition, task_id):
    """Written out from the published rule, example by example: FiLM of the first condition row of the task."""
    film = module.ln_weight_modulation.gb_weights
    out = []
    for b in range(x.shape[0]):
        first = min(i for i in range(x.shape[0]) if task_id[i] == task_id[b])
        gamma, beta = (condition[first] @ film.weight.T + film.bias).chunk(2)
        h = x[b] + residual[b]
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        out.append((h - mean) / torch.sqrt(var + module.eps) * ((1 + gamma) * module.weight + beta) + module.bias)
    return torch.stack(out)


def test_conditional_layer_norm_fused_residual():
    _, ours = twin(pub.PublishedConditionalLayerNorm, cnn.ConditionalLayerNorm, 8, 4)
    expected_module = copy.deepcopy(ours)
    x, r, cond, tid = f64(3, 2, 8), f64(3, 2, 8), f64(3, 4), torch.tensor([1, 0, 1])
    ins, exp_ins = ([t.clone().requires_grad_() for t in (x, r, cond)] for _ in range(2))
    out = ours(ins[0], ins[2], tid, residual=ins[1])
    exp = naive_conditional_layer_norm(expected_module, exp_ins[0], exp_ins[1], exp_ins[2], tid)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(exp)
    out.backward(grad)
    exp.backward(grad)
    for name, a, e in zip(("x", "residual", "condition"), ins, exp_ins):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")
    for (name, p), e in zip(ours.named_parameters(), expected_module.parameters()):
        torch.testing.assert_close(p.grad, e.grad, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")


def test_first_row_of_task():
    assert cnn.first_row_of_task(torch.tensor([5, 2, 5, 7, 2])).tolist() == [0, 1, 0, 3, 1]


# ---- Bottleneck -----------------------------------------------------------------------------------------------

def test_conditional_bottleneck():
    cfg = bert_config(hidden_size=15)
    theirs, ours = twin(pub.PublishedConditionalBottleNeck, cnn.ConditionalBottleNeck, cfg)
    assert_same(theirs, ours, [f64(4, 15), f64(4, 6, 15)])


# ---- Self-attention -------------------------------------------------------------------------------------------

def attention_twin(**cfg):
    return twin(pub.PublishedSelfAttention, cnn.ConditionalSelfAttention, bert_config(**cfg))


def extended_mask(keep):
    return (1.0 - keep.double())[:, None, None, :] * -10000.0


@pytest.mark.parametrize("hidden,heads,L", [(24, 4, 12), (30, 5, 10), (36, 3, 12)],
                         ids=["N=2 c=6", "N=3 c=4 last block cropped", "N=3 c=4"])
def test_self_attention(hidden, heads, L):
    theirs, ours = attention_twin(hidden_size=hidden, num_attention_heads=heads, max_seq_length=L)
    B = 5
    z = f64(3, hidden)[torch.tensor([0, 2, 1, 2, 0])]  # 3 tasks mixed in the batch
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 7:] = False
    keep[3, 3:] = False
    call = lambda m, h, z, mask: m(h, mask, task_embedding=z)
    assert_same(theirs, ours, [f64(B, L, hidden), z, extended_mask(keep)], call, out_index=0)


def test_self_attention_output_attentions_and_head_mask():
    theirs, ours = attention_twin(output_attentions=True)
    assert ours.output_attentions
    head_mask = torch.rand(1, 4, 1, 1, dtype=torch.float64)
    call = lambda m, h, z: m(h, None, head_mask, task_embedding=z)
    inputs = [f64(3, 12, 24), f64(3, 24)]
    assert_same(theirs, ours, inputs, call, out_index=1)  # the probabilities
    assert_same(theirs, ours, inputs, call, out_index=0)


def test_self_attention_dynamic_length_equals_padding():
    """A batch of length 7 < max_seq_length=12 gives, on its tokens, what padding to 12 gives."""
    theirs, ours = attention_twin()
    B, L, L_max = 4, 7, 12
    h, z = f64(B, L, 24), f64(B, 24)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[2, 5:] = False
    padded_h = torch.cat([h, f64(B, L_max - L, 24)], dim=1)
    padded_keep = torch.cat([keep, torch.zeros(B, L_max - L, dtype=torch.bool)], dim=1)
    short = ours(h, extended_mask(keep), task_embedding=z)[0]
    full = theirs(padded_h, extended_mask(padded_keep), task_embedding=z)[0]
    torch.testing.assert_close(short, full[:, :L], rtol=1e-12, atol=1e-12)
    # The same with a bool key padding mask, and with a tokenizer's 0/1 mask.
    torch.testing.assert_close(ours(h, keep, task_embedding=z)[0], short, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(h, keep.long(), task_embedding=z)[0], short, rtol=1e-12, atol=1e-12)


def test_self_attention_fully_padded_example_is_finite():
    theirs, ours = attention_twin()
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[1] = False
    h, z = f64(3, 12, 24).requires_grad_(), f64(3, 24)
    out = ours(h, extended_mask(keep), task_embedding=z)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, theirs(h, extended_mask(keep), task_embedding=z)[0], rtol=1e-12, atol=1e-12)
    out_bool = ours(h, keep, task_embedding=z)[0]
    assert torch.isfinite(out_bool).all() and (out_bool[1] == 0).all()
    out_bool.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_self_attention_dropout_in_training_only():
    _, ours = attention_twin(attention_probs_dropout_prob=0.5)
    h, z = f64(2, 12, 24), f64(2, 24)
    ours.eval()
    assert torch.equal(ours(h, task_embedding=z)[0], ours(h, task_embedding=z)[0])
    ours.train()
    a, b = ours(h, task_embedding=z)[0], ours(h, task_embedding=z)[0]
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_aliases():
    assert cnn.MyBertSelfAttention9 is cnn.ConditionalSelfAttention is cnn.MyBertSelfAttention10


# ---- bad input ------------------------------------------------------------------------------------------------

def _raises(exc, words, fn):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


def test_attention_bad_input():
    m = cnn.ConditionalSelfAttention(bert_config())
    z = torch.randn(2, 24)
    _raises(ValueError, ["'hidden_states'", "[B, L, 24]", "[2, 24]"], lambda: m(torch.randn(2, 24), task_embedding=z))
    _raises(ValueError, ["'hidden_states'", "last dim 24"], lambda: m(torch.randn(2, 12, 16), task_embedding=z))
    _raises(ValueError, ["sequence length 13", "max_seq_length=12"], lambda: m(torch.randn(2, 13, 24), task_embedding=z))
    _raises(ValueError, ["'task_embedding'", "required"], lambda: m(torch.randn(2, 12, 24)))
    _raises(ValueError, ["'task_embedding'", "3 rows", "batch 2"],
            lambda: m(torch.randn(2, 12, 24), task_embedding=torch.randn(3, 24)))
    _raises(TypeError, ["'hidden_states'", "float64", "float32"],
            lambda: m(torch.randn(2, 12, 24, dtype=torch.float64), task_embedding=z))
    _raises(ValueError, ["'hidden_states'", "meta", "cpu"],
            lambda: m(torch.randn(2, 12, 24, device="meta"), task_embedding=z))
    _raises(ValueError, ["hidden size (30)", "number of attention heads (4)"],
            lambda: cnn.ConditionalSelfAttention(bert_config(hidden_size=30)))
    _raises(ValueError, ["hidden_size >= max_seq_length"],
            lambda: cnn.ConditionalSelfAttention(bert_config(hidden_size=8, num_attention_heads=2, max_seq_length=12)))


def test_layer_norm_and_film_bad_input():
    cln = cnn.ConditionalLayerNorm(8, 4)
    x, c, t = torch.randn(3, 5, 8), torch.randn(3, 4), torch.tensor([0, 1, 0])
    _raises(ValueError, ["'input_'", "last dim 8"], lambda: cln(torch.randn(3, 5, 7), c, t))
    _raises(ValueError, ["'condition'", "last dim 4"], lambda: cln(x, torch.randn(3, 5), t))
    _raises(ValueError, ["'condition'", "2 rows", "batch 3"], lambda: cln(x, torch.randn(2, 4), t))
    _raises(ValueError, ["'task_id'", "[B=3]"], lambda: cln(x, c, torch.tensor([0, 1])))
    _raises(TypeError, ["'task_id'", "integer"], lambda: cln(x, c, torch.tensor([0.0, 1.0, 0.0])))
    _raises(TypeError, ["'input_'", "bfloat16"], lambda: cln(x.bfloat16(), c, t))
    film = cnn.FiLM(4, 6)
    _raises(ValueError, ["'x_cond'", "[B, 4]"], lambda: film(torch.randn(3), torch.randn(3, 2, 6)))
    _raises(ValueError, ["'x_to_film'", "last dim 6"], lambda: film(torch.randn(3, 4), torch.randn(3, 2, 5)))
    _raises(ValueError, ["'x_to_film'", "batch 2", "3 rows"], lambda: film(torch.randn(3, 4), torch.randn(2, 2, 6)))
    bott = cnn.ConditionalBottleNeck(bert_config(hidden_size=9))
    _raises(ValueError, ["'hidden_states'", "[B, L, 9]"], lambda: bott(torch.randn(2, 9), torch.randn(2, 9)))


def test_self_attention_mask_with_batch_of_one_broadcasts():
    _, ours = attention_twin()
    h, z = f64(3, 12, 24), f64(3, 24)
    keep = torch.ones(1, 12, dtype=torch.bool)
    keep[0, 9:] = False
    one = ours(h, extended_mask(keep), task_embedding=z)[0]
    full = ours(h, extended_mask(keep.expand(3, 12)), task_embedding=z)[0]
    torch.testing.assert_close(one, full, rtol=0, atol=0)
    _raises(ValueError, ["'attn_mask'", "[B, L]=[3, 12]"],
            lambda: ours(h, extended_mask(torch.ones(2, 12, dtype=torch.bool)), task_embedding=z))


def test_per_task_conditions_equal_per_example_rows():
    """The task_id extensions: one condition row per task, gathered by task id, equals per-example rows."""
    T, B = 3, 5
    task_id = torch.tensor([2, 0, 2, 1, 0])
    z = f64(T, 24)
    torch.manual_seed(1)
    film, cln = cnn.FiLM(24, 24).double(), cnn.ConditionalLayerNorm(24, 24).double()
    bott = cnn.ConditionalBottleNeck(bert_config()).double()
    _, attn = attention_twin()
    randomize_(film), randomize_(cln), randomize_(bott), randomize_(attn)
    h = f64(B, 12, 24)
    pairs = [
        (film(z, h, task_id=task_id), film(z[task_id], h)),
        (cln(h, z, task_id, condition_per_task=True), cln(h, z[task_id], task_id)),
        (bott(z, h, task_id=task_id), bott(z[task_id], h)),
        (attn(h, task_embedding=z, task_id=task_id)[0], attn(h, task_embedding=z[task_id])[0]),
    ]
    for got, exp in pairs:
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    with pytest.raises(IndexError, match="task ids must be in"):
        film(z, h, task_id=torch.tensor([0, 1, 3, 0, 0]))


# ---- issue 13: one mask rule with camtl.ops, bool task ids refused ------------------------------------------------

def test_self_attention_mask_rule_keep_masks_and_additive_agree():
    """bool / integer masks keep (True / 1 = attend), float masks add; every accepted layout gives the same."""
    _, ours = attention_twin()
    B, L = 3, 12
    h, z = f64(B, L, 24), f64(B, 24)
    keep = torch.rand(B, L) > 0.3
    keep[:, 0] = True
    keep[2, 4:] = False
    expected = ours(h, extended_mask(keep), task_embedding=z)[0]  # the published additive [B, 1, 1, L]
    for name, mask in [("bool [B, L]", keep), ("int64 [B, L]", keep.long()), ("int32 [B, L]", keep.int()),
                       ("bool [B, 1, 1, L]", keep[:, None, None, :]),
                       ("int64 [B, 1, 1, L]", keep.long()[:, None, None, :]),
                       ("additive [B, 1, L, L]", extended_mask(keep).expand(B, 1, L, L))]:
        torch.testing.assert_close(ours(h, mask, task_embedding=z)[0], expected, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("mask", [lambda keep: keep.double(), lambda keep: (1.0 - keep.double()) * -10000.0],
                         ids=["float 0/1", "float 0/-10000"])
def test_self_attention_refuses_2d_float_masks(mask):
    """A 2-D float mask is either a 0/1 keep-mask or an additive mask: guessing silently inverts one of them."""
    _, ours = attention_twin()
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 6:] = False
    _raises(ValueError, ["2-D float 'attention_mask'", "ambiguous", "bool or integer keep-mask [B, L]",
                         "[B, 1, 1, L]"], lambda: ours(f64(2, 12, 24), mask(keep), task_embedding=f64(2, 24)))


def test_bool_task_ids_are_refused():
    """True / False would silently be tasks 1 / 0."""
    tid = torch.tensor([True, False])
    cln, film = cnn.ConditionalLayerNorm(24, 24), cnn.FiLM(24, 24)
    bott, attn = cnn.ConditionalBottleNeck(bert_config()), cnn.ConditionalSelfAttention(bert_config())
    h, z = torch.randn(2, 12, 24), torch.randn(2, 24)
    for name, call in [("ConditionalLayerNorm", lambda: cln(h, z, tid)),
                       ("ConditionalLayerNorm", lambda: cln(h, z, tid, condition_per_task=True)),
                       ("FiLM", lambda: film(z, h, task_id=tid)),
                       ("ConditionalBottleNeck", lambda: bott(z, h, task_id=tid)),
                       ("ConditionalSelfAttention", lambda: attn(h, task_embedding=z, task_id=tid))]:
        _raises(TypeError, [name, "'task_id'", "integer", "torch.bool"], call)


# ---- issue 14: the modules on the triton backend (interpreter, fp32) against the torch backend ---------------------

def _triton_vs_torch(module, inputs, call, kernel_ops):
    """call(module, *inputs) on both backends in fp32: the same output and gradients (inputs and parameters)."""
    module = randomize_(module.float())
    results = {}
    grad = None
    for backend in ("torch", "triton"):
        m = copy.deepcopy(module)
        ins = [t.float().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        with camtl.use_backend(backend):
            out = call(m, *ins)
        for op in kernel_ops:  # the kernels really ran (their ops are in the graph) on triton only
            assert graph_has(out, op) == (backend == "triton"), (backend, op)
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad)
        results[backend] = (out.detach(), [t.grad for t in ins if t.is_floating_point()],
                            {n: p.grad for n, p in m.named_parameters()})
    (out_t, ins_t, params_t), (out_k, ins_k, params_k) = results["torch"], results["triton"]
    assert_close(out_k, out_t, torch.float32, "output")
    for i, (a, e) in enumerate(zip(ins_k, ins_t)):
        assert_close(a, e, torch.float32, f"grad of input {i}")
    largest = max(g.abs().max().item() for g in params_t.values())
    for name, e in params_t.items():
        assert e is not None and params_k[name] is not None, name
        if name == "key.bias":
            # Exactly 0 in exact arithmetic (it shifts a whole row of scores): both are rounding noise.
            for g in (params_k[name], e):
                assert g.abs().max() <= 1e-5 * max(1.0, largest), (name, g.abs().max(), largest)
            continue
        assert_close(params_k[name], e, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("per_task", [False, True], ids=["per-example x_cond", "task_id"])
def test_film_triton_matches_torch(per_task):
    tid = torch.tensor([1, 0, 1])
    z = torch.randn(2 if per_task else 3, 4)
    call = (lambda m, z, x: m(z, x, task_id=tid)) if per_task else (lambda m, z, x: m(z, x))
    _triton_vs_torch(cnn.FiLM(4, 6), [z, torch.randn(3, 5, 6)], call, ["camtl::film_fwd"])


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused residual"])
def test_conditional_layer_norm_triton_matches_torch(residual):
    tid = torch.tensor([2, 0, 2, 1])
    inputs = [torch.randn(4, 3, 10) * 2, torch.randn(4, 6), tid] + ([torch.randn(4, 3, 10)] if residual else [])
    call = lambda m, x, c, t, *r: m(x, c, t, residual=r[0] if r else None)
    _triton_vs_torch(cnn.ConditionalLayerNorm(10, 6), inputs, call, ["camtl::conditional_layer_norm_fwd"])


def test_conditional_bottleneck_triton_matches_torch():
    _triton_vs_torch(cnn.ConditionalBottleNeck(bert_config(hidden_size=15)),
                     [torch.randn(3, 15), torch.randn(3, 5, 15)], lambda m, z, h: m(z, h), ["camtl::film_linear_fwd"])


@pytest.mark.parametrize("mask", ["none", "bool", "published additive"])
def test_self_attention_triton_matches_torch(mask):
    B, L = 3, 10
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 6:] = False
    keep[2, 3:] = False
    masks = {"none": None, "bool": keep, "published additive": extended_mask(keep).float()}
    call = lambda m, h, z: m(h, masks[mask], task_embedding=z)[0]
    _triton_vs_torch(cnn.ConditionalSelfAttention(bert_config()), [torch.randn(B, L, 24), torch.randn(B, 24)], call,
                     ["camtl::conditional_attention_fwd", "camtl::film_fwd"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,L", [(0, 5), (2, 0)], ids=["B=0", "L=0"])
def test_modules_on_empty_batches(backend, B, L):
    """An empty batch or length gives an empty output and zero parameter gradients, on both backends."""
    cfg = bert_config()
    h, z, tid = torch.randn(B, L, 24, requires_grad=True), torch.randn(B, 24), torch.zeros(B, dtype=torch.long)
    cases = [(cnn.ConditionalLayerNorm(24, 24), lambda m: m(h, z, tid)),
             (cnn.FiLM(24, 24), lambda m: m(z, h)),
             (cnn.ConditionalBottleNeck(cfg), lambda m: m(z, h)),
             (cnn.ConditionalSelfAttention(cfg),
              lambda m: m(h, torch.ones(B, L, dtype=torch.bool), task_embedding=z)[0])]
    for module, call in cases:
        with camtl.use_backend(backend):
            out = call(module)
        assert out.shape == (B, L, 24), type(module).__name__
        out.sum().backward()
        for name, p in module.named_parameters():
            assert p.grad is None or (p.grad == 0).all(), (type(module).__name__, name)
