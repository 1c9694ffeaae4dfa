import os
import zlib
from types import SimpleNamespace

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton compiles them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances (rtol, atol) by dtype, against a float64 reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    """Close within the dtype's tolerance; atol scales with the reference's magnitude (sums of many terms)."""
    rtol, atol = TOL[dtype or actual.dtype]
    expected = expected.double()
    atol = atol * max(1.0, expected.abs().max().item()) if expected.numel() else atol
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


@pytest.fixture
def device():
    """CPU by default; tests/gpu sets CAMTL_TEST_DEVICE=cuda to rerun them on a GPU."""
    return torch.device(os.environ.get("CAMTL_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Random inputs per test, reproducible from the test's name; CAMTL_TEST_SEED draws another set.
    base = int(os.environ.get("CAMTL_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2**31))
    yield


def bert_config(hidden_size=24, num_attention_heads=4, max_seq_length=12, attention_probs_dropout_prob=0.0,
                output_attentions=False, **kw):
    """A published-style config object (transformers 2.11 BertConfig plus max_seq_length)."""
    return SimpleNamespace(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                           max_seq_length=max_seq_length, attention_probs_dropout_prob=attention_probs_dropout_prob,
                           output_attentions=output_attentions, **kw)
