"""Backend registry, selection (CAMTL_BACKEND / use_backend) and camtl info."""

import json
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


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_unlanded_backends_are_off_with_a_reason(name):
    st = camtl.backend_states()[name]
    assert not st.available
    assert len(st.reason) > 10


def test_auto_and_torch_resolve_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)
    assert backends.resolve("film", torch.device("cpu"))[0] == "torch"
    with camtl.use_backend("torch"):
        assert backends.resolve("conditional_attention", torch.device("cpu"))[0] == "torch"


@pytest.mark.parametrize("name", ["triton", "cuda"])
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
    for word in ("camtl", "torch", "triton", "transformers", "device", "backends:"):
        assert word in text
    assert data["torch"] == torch.__version__
    assert set(data["backends"]) == {"torch", "triton", "cuda"}
    assert data["backends"]["torch"]["available"] is True


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "camtl", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends:" in out and "torch" in out
    js = subprocess.run([sys.executable, "-m", "camtl", "info", "--json"], capture_output=True, text=True,
                        check=True).stdout
    assert json.loads(js)["camtl"] == camtl.__version__
