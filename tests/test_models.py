"""CA-MTL encoders: published state dicts load strict and give the published outputs (float64)."""

import pytest
import torch
from transformers import BertConfig

from camtl.models import CaMtlBaseEncoder, CaMtlLargeEncoder
from camtl.testing.published import PublishedCaMtlEncoder


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


def test_hidden_states_attentions_and_dynamic_length():
    ours = CaMtlBaseEncoder(tiny_config(4), num_tasks=3, max_seq_length=12).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    input_ids, attention_mask, token_type_ids, task_id = batch()
    out = ours(input_ids, attention_mask=attention_mask, task_id=task_id, output_hidden_states=True,
               output_attentions=True)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert out.attentions[0].shape == (5, 4, 12, 12)
    torch.testing.assert_close(out.hidden_states[-1], out[0])
    # A batch padded to 8 gives, on its tokens, what the same examples padded to 12 give.
    short = ours(input_ids[:, :8], attention_mask=attention_mask[:, :8], task_id=task_id)[0]
    mask12 = attention_mask.clone()
    mask12[:, 8:] = 0
    full = ours(input_ids, attention_mask=mask12, task_id=task_id)[0]
    torch.testing.assert_close(short, full[:, :8], rtol=1e-12, atol=1e-12)


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
    with pytest.raises(ValueError, match="greater than max_seq_length=12"):
        enc(torch.randint(1, 50, (2, 13)), task_id=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="even number of layers"):
        CaMtlBaseEncoder(tiny_config(3), num_tasks=2, max_seq_length=12)
    with pytest.raises(ValueError, match="num_tasks"):
        CaMtlLargeEncoder(tiny_config(3), max_seq_length=12)
