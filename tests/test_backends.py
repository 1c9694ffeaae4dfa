"""Backend registry, selection (CAMTL_BACKEND / use_backend) and camtl info."""

import json
import os
import subprocess
import sys

import pytest
import torch

import camtl
from camtl import backends, ops


def _film_args():
    return torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)


def test_torch_backend_always_available_with_every_op():
    st = camtl.backend_states()["torch"]
    assert st.available and set(st.ops) == set(ops.OP_NAMES)


def test_cuda_backend_is_off_with_a_reason():
    st = camtl.backend_states()["cuda"]
    assert not st.available and "camtl._C" in st.reason


def test_triton_backend_state_follows_the_device():
    st = camtl.backend_states()["triton"]
    assert "conditional_attention" in st.ops
    if torch.cuda.is_available():
        assert st.available and st.reason == "CUDA tensors"
    else:  # tests/conftest.py sets TRITON_INTERPRET=1 on a CPU machine
        assert st.available and "TRITON_INTERPRET=1" in st.reason


def test_triton_off_without_device_or_interpreter():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); import camtl; "
            "st = camtl.backend_states()['triton']; print(st.available, st.reason)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    if not torch.cuda.is_available():
        assert out.startswith("False") and "TRITON_INTERPRET=1 is not set" in out


def test_a_named_backend_runs_the_ops_it_lacks_on_torch(monkeypatch):
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)
    assert "block_bias" not in camtl.backend_states()["triton"].ops
    with camtl.use_backend("triton"):
        assert backends.resolve("block_bias", torch.device("cpu"))[0] == "torch"


def test_auto_never_picks_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)
    assert backends.resolve("conditional_attention", torch.device("cpu"))[0] == "torch"


def test_reference_only_arguments(monkeypatch):
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)
    q = torch.randn(1, 1, 4, 2)
    table = torch.randn(1, 4, 2)
    out, probs = ops.conditional_attention(q, q, q, table, return_probs=True)
    assert probs.shape == (1, 1, 4, 4)
    with camtl.use_backend("triton"):  # only the reference forms the probabilities, whatever the backend
        out2, probs2 = ops.conditional_attention(q, q, q, table, return_probs=True)
    assert torch.equal(probs, probs2)
    with camtl.use_backend("triton"), pytest.raises(camtl.BackendUnavailableError, match="float64"):
        ops.conditional_attention(q.double(), q.double(), q.double(), table.double())
    with camtl.use_backend("triton"), pytest.raises(camtl.BackendUnavailableError, match="4-D mask"):
        ops.conditional_attention(q, q, q, table, None, torch.zeros(1, 1, 1, 4))


def test_auto_and_torch_resolve_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)
    assert backends.resolve("film", torch.device("cpu"))[0] == "torch"
    with camtl.use_backend("torch"):
        assert backends.resolve("conditional_attention", torch.device("cpu"))[0] == "torch"


@pytest.mark.parametrize("name", ["cuda"])
def test_explicit_unavailable_backend_raises_and_says_why(name, monkeypatch):
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)
    reason = camtl.backend_states()[name].reason
    with camtl.use_backend(name):
        with pytest.raises(camtl.BackendUnavailableError) as info:
            ops.film(*_film_args())
    assert name in str(info.value) and reason in str(info.value)
    monkeypatch.setenv("CAMTL_BACKEND", name)
    with pytest.raises(camtl.BackendUnavailableError):
        ops.film(*_film_args())


def test_use_backend_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv("CAMTL_BACKEND", "cuda")
    assert backends.requested_backend() == "cuda"
    with camtl.use_backend("torch"):
        assert backends.requested_backend() == "torch"
        ops.film(*_film_args())  # runs
    assert backends.requested_backend() == "cuda"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        with camtl.use_backend("tpu"):
            pass
    monkeypatch.setenv("CAMTL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="CAMTL_BACKEND='tpu'"):
        ops.film(*_film_args())


def test_info_reports_versions_backends_and_device(capsys):
    data = camtl.info()
    text = capsys.readouterr().out
    for word in ("camtl", "torch", "triton", "transformers", "device", "backends", "cuda"):
        assert word in text
    assert data["torch"] == torch.__version__
    assert set(data["backends"]) == {"torch", "triton", "cuda"}
    assert data["backends"]["torch"]["available"] is True


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "camtl", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends" in out and "torch" in out
    js = subprocess.run([sys.executable, "-m", "camtl", "info", "--json"], capture_output=True, text=True,
                        check=True).stdout
    assert json.loads(js)["camtl"] == camtl.__version__
