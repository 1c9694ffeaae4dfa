"""Packed (padding-free) input through the encoders and CaMtl (DESIGN.md §8, issue 11).

The reference is the same model on the same sequences padded to the longest with an attention_mask: on
every real token, packed equals padded (float64, 1e-12), outputs and every parameter gradient.
"""

import pytest
import torch
from transformers import BertConfig

from camtl.backends import torch_ref
from camtl.models import CaMtl, CaMtlBaseEncoder, CaMtlLargeEncoder

MAX_LEN = 12
LENGTHS = [4, 1, MAX_LEN, 7, MAX_LEN, 2]  # a length-1 sequence and two at max_seq_length
TASKS = [2, 0, 2, 1, 0, 2]  # mixed and repeated
TOL = dict(rtol=1e-12, atol=1e-12)


def tiny_config(layers):
    return BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def perturbed(model):
    """Random weights everywhere (the CBDA matrices and FiLM biases start at zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def sequences(lengths=LENGTHS):
    """Each sequence's input_ids (no pad id 0) and token_type_ids."""
    ids = [torch.randint(1, 50, (n,)) for n in lengths]
    types = [(torch.arange(n) >= n // 2).long() for n in lengths]
    return ids, types


def packed_inputs(ids, types):
    lengths = [len(x) for x in ids]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return torch.cat(ids)[None], torch.cat(types)[None], positions[None], cu


def padded_inputs(ids, types):
    Lmax = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), Lmax, dtype=torch.long)
    token_type_ids = torch.zeros(len(ids), Lmax, dtype=torch.long)
    attention_mask = torch.zeros(len(ids), Lmax, dtype=torch.long)
    for s, (x, t) in enumerate(zip(ids, types)):
        input_ids[s, :len(x)], token_type_ids[s, :len(x)], attention_mask[s, :len(x)] = x, t, 1
    return input_ids, token_type_ids, attention_mask


def real_tokens(padded, lengths):
    """[S, Lmax, D] -> [1, N, D]: the real tokens of each sequence, end to end."""
    return torch.cat([padded[s, :n] for s, n in enumerate(lengths)])[None]


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def run_packed(model, mode, ids, types, tasks, **kwargs):
    input_ids, token_type_ids, position_ids, cu = packed_inputs(ids, types)
    if mode == "position_ids":
        return model(input_ids, token_type_ids=token_type_ids, position_ids=position_ids, task_id=tasks, **kwargs)
    if mode == "cu_seqlens":
        return model(input_ids, token_type_ids=token_type_ids, cu_seqlens=cu, max_seqlen=MAX_LEN, task_id=tasks,
                     **kwargs)
    # both, flat [N] tensors
    return model(input_ids[0], token_type_ids=token_type_ids[0], position_ids=position_ids[0], cu_seqlens=cu,
                 task_id=tasks, **kwargs)


@pytest.mark.parametrize("mode,bucket_cost", [("position_ids", None), ("cu_seqlens", None), ("flat-both", None),
                                               ("cu_seqlens", 0)],
                         ids=["position_ids", "cu_seqlens", "flat-both", "cu_seqlens-bucketed"])
@pytest.mark.parametrize("cls,layers", [(CaMtlBaseEncoder, 4), (CaMtlLargeEncoder, 3)], ids=["base-4", "large-3"])
def test_packed_encoder_equals_padded_on_real_tokens(cls, layers, mode, bucket_cost, monkeypatch):
    if bucket_cost is not None:  # the attention in several length buckets, not one padded to the longest
        monkeypatch.setattr(torch_ref, "BUCKET_COST", bucket_cost)
        assert len(torch_ref.length_buckets(LENGTHS, torch_ref.MAX_LENGTH_BUCKETS, bucket_cost)) > 1
    model = perturbed(cls(tiny_config(layers), num_tasks=3, max_seq_length=MAX_LEN))
    ids, types = sequences()
    tasks = torch.tensor(TASKS)
    N, S = sum(LENGTHS), len(LENGTHS)

    input_ids, token_type_ids, attention_mask = padded_inputs(ids, types)
    want = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=tasks,
                 output_hidden_states=True, output_attentions=True)
    seq_weight, pool_weight = torch.randn(1, N, 24, dtype=torch.float64), torch.randn(S, 24, dtype=torch.float64)
    ((real_tokens(want.last_hidden_state, LENGTHS) * seq_weight).sum() + (want.pooler_output * pool_weight).sum()
     ).backward()
    want_grads = grads(model)
    model.zero_grad(set_to_none=True)

    got = run_packed(model, mode, ids, types, tasks, output_hidden_states=True, output_attentions=True)
    assert got.last_hidden_state.shape == (1, N, 24) and got.pooler_output.shape == (S, 24)
    torch.testing.assert_close(got.last_hidden_state, real_tokens(want.last_hidden_state, LENGTHS), **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)
    assert len(got.hidden_states) == layers + 1 and len(got.attentions) == layers
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        torch.testing.assert_close(g, real_tokens(w, LENGTHS), **TOL, msg=f"hidden state {i}")
    for i, (g, w) in enumerate(zip(got.attentions, want.attentions, strict=True)):
        assert g.shape == (S, 4, MAX_LEN, MAX_LEN)
        for s, n in enumerate(LENGTHS):  # each sequence's corner; zero outside it
            torch.testing.assert_close(g[s, :, :n, :n], w[s, :, :n, :n], **TOL, msg=f"attention {i} seq {s}")
            assert (g[s, :, n:] == 0).all() and (g[s, :, :, n:] == 0).all()
    ((got.last_hidden_state * seq_weight).sum() + (got.pooler_output * pool_weight).sum()).backward()
    got_grads = grads(model)
    for name, w in want_grads.items():
        torch.testing.assert_close(got_grads[name], w, **TOL, msg=name)
    assert any(g.abs().sum() > 0 for n, g in got_grads.items() if "random_weight_matrix" in n)


def test_packed_camtl_loss_logits_and_gradients_equal_padded():
    torch.manual_seed(0)
    model = perturbed(CaMtl(tiny_config(4), task_num_labels=[3, 1, 2], max_seq_length=MAX_LEN))
    ids, types = sequences()
    tasks = torch.tensor(TASKS)
    labels = torch.tensor([1.0, 0.0, 0.0, 0.7, 2.0, 1.0], dtype=torch.float64)  # task 1 is regression

    input_ids, token_type_ids, attention_mask = padded_inputs(ids, types)
    want = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=tasks,
                 labels=labels)
    want.loss.backward()
    want_grads = grads(model)
    model.zero_grad(set_to_none=True)

    got = run_packed(model, "position_ids", ids, types, tasks, labels=labels)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    torch.testing.assert_close(got.entropy, want.entropy, **TOL)
    torch.testing.assert_close(got.task_loss, want.task_loss, **TOL)
    assert got.sequence_output.shape == (1, sum(LENGTHS), 24)
    for name, w in want_grads.items():
        torch.testing.assert_close(grads(model)[name], w, **TOL, msg=name)


def bad_call(case):
    """(kwargs for a packed call that must be refused, the argument the error names)."""
    ids, types = sequences([3, 2, 4])
    input_ids, token_type_ids, position_ids, cu = packed_inputs(ids, types)
    tasks = torch.tensor([0, 1, 2])
    ok = dict(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, task_id=tasks)
    if case == "position_ids do not start at 0":
        return {**ok, "position_ids": position_ids + 1}, "position_ids"
    if case == "position_ids not counting":
        bad = position_ids.clone()
        bad[0, 4] = 3  # 0 1 2 | 0 3
        return {**ok, "position_ids": bad}, "position_ids"
    if case == "position_ids disagree with cu_seqlens":
        return {**ok, "cu_seqlens": torch.tensor([0, 2, 5, 9], dtype=torch.int32)}, "position_ids"
    if case == "sequence longer than max_seq_length":
        ids, types = sequences([3, MAX_LEN + 1])
        input_ids, token_type_ids, position_ids, _ = packed_inputs(ids, types)
        return dict(input_ids=input_ids, position_ids=position_ids, task_id=torch.tensor([0, 1])), "max_seq_length"
    if case == "too few task ids":
        return {**ok, "task_id": tasks[:2]}, "task_id"
    if case == "too many task ids":
        return {**ok, "task_id": torch.tensor([0, 1, 2, 0])}, "task_id"
    if case == "cu_seqlens not increasing":
        return {**ok, "position_ids": None, "cu_seqlens": torch.tensor([0, 3, 3, 9], dtype=torch.int32)}, \
            "cu_seqlens"
    if case == "cu_seqlens not ending at N":
        return {**ok, "position_ids": None, "cu_seqlens": torch.tensor([0, 3, 5, 8], dtype=torch.int32)}, \
            "cu_seqlens"
    if case == "cu_seqlens float":
        return {**ok, "position_ids": None, "cu_seqlens": torch.tensor([0.0, 3, 5, 9])}, "cu_seqlens"
    if case == "max_seqlen below the longest":
        return {**ok, "cu_seqlens": cu, "max_seqlen": 3}, "max_seqlen"
    if case == "attention_mask":
        return {**ok, "attention_mask": torch.ones_like(input_ids)}, "attention_mask"
    if case == "no boundaries":
        return dict(input_ids=input_ids[0], task_id=tasks), "position_ids"
    if case == "two rows":
        return {**ok, "input_ids": input_ids.expand(2, -1), "cu_seqlens": cu}, "input_ids"
    raise AssertionError(case)


BAD_CASES = ["position_ids do not start at 0", "position_ids not counting", "position_ids disagree with cu_seqlens",
             "sequence longer than max_seq_length", "too few task ids", "too many task ids",
             "cu_seqlens not increasing", "cu_seqlens not ending at N", "cu_seqlens float",
             "max_seqlen below the longest", "attention_mask", "no boundaries", "two rows"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_packing_is_refused_naming_the_argument(case):
    model = CaMtlBaseEncoder(tiny_config(2), num_tasks=3, max_seq_length=MAX_LEN).eval()
    kwargs, argument = bad_call(case)
    with pytest.raises(ValueError, match=argument):
        model(**kwargs)


def test_one_padded_row_is_not_taken_for_packed_input():
    """A batch of one with position_ids 0..L-1 and one task stays a padded batch: [1, L] outputs, [1, D] pooled."""
    model = perturbed(CaMtlBaseEncoder(tiny_config(2), num_tasks=3, max_seq_length=MAX_LEN))
    input_ids = torch.randint(1, 50, (1, 5))
    out = model(input_ids, position_ids=torch.arange(5)[None], task_id=torch.tensor([1]))
    packed = model(input_ids, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), task_id=torch.tensor([1]))
    assert out.pooler_output.shape == (1, 24)
    torch.testing.assert_close(packed.last_hidden_state, out.last_hidden_state, **TOL)
    torch.testing.assert_close(packed.pooler_output, out.pooler_output, **TOL)


def test_packed_self_attention_module_equals_padded_and_refuses_a_mask():
    """camtl.nn.ConditionalSelfAttention's packed path (cu_seqlens): [N, D] in, [N, D] out, as padded."""
    from camtl.nn import ConditionalSelfAttention

    config = tiny_config(2)
    config.max_seq_length = MAX_LEN
    attention = perturbed(ConditionalSelfAttention(config))
    tasks = torch.randn(3, 24, dtype=torch.float64)
    task_id = torch.tensor(TASKS)
    hidden = [torch.randn(n, 24, dtype=torch.float64) for n in LENGTHS]
    padded = torch.zeros(len(LENGTHS), MAX_LEN, 24, dtype=torch.float64)
    keep = torch.zeros(len(LENGTHS), MAX_LEN, dtype=torch.bool)
    for s, h in enumerate(hidden):
        padded[s, :len(h)], keep[s, :len(h)] = h, True
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    want = attention(padded, keep, task_embedding=tasks, task_id=task_id)[0]
    got = attention(torch.cat(hidden), task_embedding=tasks, task_id=task_id, cu_seqlens=cu)[0]
    torch.testing.assert_close(got[None], real_tokens(want, LENGTHS), **TOL)
    with pytest.raises(ValueError, match="attention_mask"):
        attention(torch.cat(hidden), torch.ones(1, sum(LENGTHS)), task_embedding=tasks, task_id=task_id,
                  cu_seqlens=cu)
    with pytest.raises(ValueError, match="task_id"):
        attention(torch.cat(hidden), task_embedding=tasks, task_id=task_id[:-1], cu_seqlens=cu)


@pytest.mark.parametrize("shape", ["[1, N, D]", "[N, D]"])
def test_packed_inputs_embeds_equal_packed_input_ids(shape):
    model = perturbed(CaMtlLargeEncoder(tiny_config(3), num_tasks=3, max_seq_length=MAX_LEN))
    ids, types = sequences()
    input_ids, token_type_ids, position_ids, cu = packed_inputs(ids, types)
    tasks = torch.tensor(TASKS)
    want = model(input_ids, token_type_ids=token_type_ids, position_ids=position_ids, task_id=tasks)
    embeds = model.embeddings.word_embeddings(input_ids)
    got = model(inputs_embeds=embeds if shape == "[1, N, D]" else embeds[0], token_type_ids=token_type_ids,
                cu_seqlens=cu, task_id=tasks)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)


# ---- the packed attention's torch reference: sequences grouped by length into buckets --------------------------

def naive_varlen_attention(q, k, v, table, index, lengths, width, head_mask):
    """A loop over sequences: each one's scores, its task's top-left Ls×Ls bias corner, softmax, head_mask, P·V.
    Returns out [N, H, d] and the probs [S, H, width, width] (zero outside each corner)."""
    c = table.shape[-1]
    outs, probs = [], q.new_zeros(len(lengths), q.shape[1], width, width)
    for s, (a, n) in enumerate(zip([0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist()), lengths)):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        same_block = i // c == j // c
        bias = torch.where(same_block, table[index[s], i, (j - c * (i // c)).clamp(0, c - 1)], 0.0)
        scores = torch.einsum("ihd,jhd->hij", q[a:a + n], k[a:a + n]) / q.shape[-1] ** 0.5 + bias
        p = torch.softmax(scores, -1) * head_mask[s, :, :n, :n]
        probs[s, :, :n, :n] = p
        outs.append(torch.einsum("hij,jhd->ihd", p, v[a:a + n]))
    return torch.cat(outs), probs


BUCKET_LENGTHS = [4, 1, 12, 7, 12, 2, 9, 3, 12, 5, 6]


@pytest.mark.parametrize("bucket_cost", [0, 40, torch_ref.BUCKET_COST])
def test_varlen_reference_buckets_equal_a_loop_over_sequences(bucket_cost, monkeypatch):
    monkeypatch.setattr(torch_ref, "BUCKET_COST", bucket_cost)
    H, d, c, G = 3, 4, 5, 3
    N, S, width = sum(BUCKET_LENGTHS), len(BUCKET_LENGTHS), max(BUCKET_LENGTHS)
    q, k, v = (torch.randn(N, H, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(G, MAX_LEN, c, dtype=torch.float64, requires_grad=True)
    head_mask = torch.rand(S, H, 1, width, dtype=torch.float64, requires_grad=True)  # per sequence, head, key
    index = torch.randint(0, G, (S,))
    cu = torch.tensor([0] + BUCKET_LENGTHS).cumsum(0).to(torch.int32)
    out, probs = torch_ref.conditional_attention_varlen(q, k, v, cu, width, table, index, head_mask=head_mask,
                                                        return_probs=True)
    want_out, want_probs = naive_varlen_attention(q, k, v, table, index, BUCKET_LENGTHS, width,
                                                  head_mask.expand(S, H, width, width))
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(probs, want_probs, **TOL)
    grad_out, grad_probs = torch.randn_like(out), torch.randn_like(probs)
    leaves = [q, k, v, table, head_mask]
    got = torch.autograd.grad((out, probs), leaves, (grad_out, grad_probs))
    want = torch.autograd.grad((want_out, want_probs), leaves, (grad_out, grad_probs))
    for name, g, w in zip(["q", "k", "v", "table", "head_mask"], got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL, msg=f"grad of {name}")
    # Dropout draws per bucket: the same seed gives the same output with or without the probs.
    torch.manual_seed(3)
    dropped, _ = torch_ref.conditional_attention_varlen(q, k, v, cu, width, table, index, dropout_p=0.3,
                                                        return_probs=True)
    torch.manual_seed(3)
    again, _ = torch_ref.conditional_attention_varlen(q, k, v, cu, width, table, index, dropout_p=0.3)
    assert torch.equal(dropped, again) and not torch.allclose(dropped, out)


def test_varlen_reference_plan_made_in_inference_mode_serves_a_backward_later():
    """The bucket plan is cached by the lengths: one first made under inference_mode must not hold inference
    tensors, which a training step with the same lengths could not save for its backward."""
    lengths = [3, 8, 5, 2, 7]  # lengths no other test uses: the plan is made here
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(2, MAX_LEN, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 1, 1, 0, 1])
    with torch.inference_mode():
        first, _ = torch_ref.conditional_attention_varlen(q, k, v, cu, 8, table, index)
    out, _ = torch_ref.conditional_attention_varlen(q, k, v, cu, 8, table, index)
    torch.testing.assert_close(out, first, **TOL)
    grads = torch.autograd.grad(out.sum(), [q, k, v, table])
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("max_buckets,bucket_cost", [(1, 0), (3, 0), (8, 0), (8, 30), (8, 10 ** 6)])
def test_length_buckets_are_a_cheapest_split_by_length(max_buckets, bucket_cost):
    """Every sequence in one bucket; the cost sum(n_b * L_b^2 + bucket_cost) is the least over every split of
    the sorted lengths into at most max_buckets runs (brute force)."""
    import itertools

    lengths = torch.randint(1, 40, (9,)).tolist()
    buckets = torch_ref.length_buckets(lengths, max_buckets, bucket_cost)
    assert sorted(s for b in buckets for s in b) == list(range(len(lengths)))
    assert 1 <= len(buckets) <= max_buckets

    def cost(groups):
        return sum(len(g) * max(g) ** 2 + bucket_cost for g in groups)

    ordered = sorted(lengths)
    best = min(cost([ordered[a:b] for a, b in zip((0,) + cuts, cuts + (len(ordered),))])
               for n_cuts in range(max_buckets) for cuts in itertools.combinations(range(1, len(ordered)), n_cuts))
    assert cost([[lengths[s] for s in b] for b in buckets]) == best
    assert torch_ref.length_buckets([], max_buckets, bucket_cost) == []
