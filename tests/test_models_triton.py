"""Whole encoders on the Triton kernels (interpreted on CPU) against the torch backend: outputs, every gradient."""

import contextlib
import importlib
from unittest import mock

import pytest
import torch
from transformers import BertConfig

import camtl
from camtl.models import CaMtlBaseEncoder, CaMtlLargeEncoder

# Every kernel launcher the encoder's ops call (module, function).
LAUNCHERS = [("camtl.kernels.attention", "attention_forward"), ("camtl.kernels.attention", "attention_backward"),
             ("camtl.kernels.film", "film_forward"), ("camtl.kernels.film", "film_backward"),
             ("camtl.kernels.layer_norm", "layer_norm_forward"), ("camtl.kernels.layer_norm", "layer_norm_backward"),
             ("camtl.kernels.adapter", "film_linear_forward")]


@contextlib.contextmanager
def counted_launches():
    """Counts the calls of each kernel launcher inside the block."""
    counts = {}
    with contextlib.ExitStack() as stack:
        for module_name, fn_name in LAUNCHERS:
            module = importlib.import_module(module_name)
            real = getattr(module, fn_name)

            def counting(*args, _real=real, _name=fn_name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _real(*args, **kwargs)

            stack.enter_context(mock.patch.object(module, fn_name, counting))
        yield counts


def tiny_config(layers):
    return BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def run(model, backend, inputs, seq_grad, pooled_grad):
    model.zero_grad(set_to_none=True)
    with camtl.use_backend(backend):
        out = model(**inputs)
        ((out[0] * seq_grad).sum() + (out[1] * pooled_grad).sum()).backward()
    return out[0].detach(), out[1].detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls,layers", [(CaMtlBaseEncoder, 4), (CaMtlLargeEncoder, 3)], ids=["base-4", "large-3"])
def test_encoder_on_triton_kernels_matches_torch_backend(cls, layers):
    model = cls(tiny_config(layers), num_tasks=3, max_seq_length=16)
    with torch.no_grad():  # every conditional generator non-zero, so each conditional path counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    B, L = 2, 14  # L < max_seq_length: the bias table is cropped
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 9:] = 0
    inputs = dict(input_ids=torch.randint(1, 40, (B, L)), attention_mask=attention_mask,
                  token_type_ids=(torch.arange(L) >= 7).long().expand(B, L), task_id=torch.tensor([2, 0]))
    seq_grad, pooled_grad = torch.randn(B, L, 32), torch.randn(B, 32)
    want_seq, want_pooled, want_grads = run(model, "torch", inputs, seq_grad, pooled_grad)
    with counted_launches() as launches:
        seq, pooled, grads = run(model, "triton", inputs, seq_grad, pooled_grad)
    # Every kernel family ran, forward and backward (the adapter's backward is a GEMM plus the FiLM kernel).
    assert set(launches) == {fn for _, fn in LAUNCHERS}, launches
    assert launches["attention_forward"] == layers and launches["attention_backward"] == layers
    torch.testing.assert_close(seq, want_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert want is not None and grads[name] is not None, name
        atol = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=atol, msg=name)
