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


def test_info_reports_the_cuda_extension_as_built_or_why_not(capsys, monkeypatch):
    """A structured field: the archs camtl._C was compiled for and the device query's answer, or why it is absent."""
    import importlib.util

    data = camtl.info()
    text = capsys.readouterr().out
    ext = data["cuda_extension"]
    if importlib.util.find_spec("camtl._C") is not None:
        import camtl._C as compiled

        assert ext["built"] is True and ext["archs"] == compiled.ARCHS, ext
        assert isinstance(ext["device_count"], int) and isinstance(ext["device_status"], int)
        assert f"built for {compiled.ARCHS}" in text
    else:
        assert ext["built"] is False and ext["reason"], ext
    import camtl.backends.cuda_ext as cuda_ext

    def broken():
        raise ImportError("camtl._C: undefined symbol")

    monkeypatch.setattr(cuda_ext, "extension_info", broken)
    ext = camtl.info()["cuda_extension"]
    assert ext == {"built": False, "reason": "ImportError: camtl._C: undefined symbol"}
    assert "camtl._C       not built (ImportError" in capsys.readouterr().out


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "camtl", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends" in out and "torch" in out
    js = subprocess.run([sys.executable, "-m", "camtl", "info", "--json"], capture_output=True, text=True,
                        check=True).stdout
    assert json.loads(js)["camtl"] == camtl.__version__


# ---- float32 on CUDA: TF32 tensor cores or the torch backend -------------------------------------------------

CUDA = torch.device("cuda")  # a device descriptor: resolve reads only its type, so no GPU is needed


@pytest.fixture
def tf32(monkeypatch):
    """Sets whether torch allows TF32 (the decision's input), with the backend requested left to auto."""
    monkeypatch.delenv("CAMTL_BACKEND", raising=False)

    def set_allowed(allowed: bool):
        monkeypatch.setattr(backends, "tf32_matmul_allowed", lambda: allowed)
    return set_allowed


def test_tf32_matmul_allowed_follows_torch_settings():
    """Every public way to allow TF32 for float32 matmuls, read back (a subprocess: the settings are global)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision")
    code = (
        "import torch, warnings; warnings.simplefilter('ignore'); from camtl.backends import tf32_matmul_allowed as a\n"
        "m = torch.backends.cuda.matmul; seen = [a()]\n"
        "m.fp32_precision = 'tf32'; seen.append(a()); m.fp32_precision = 'ieee'; seen.append(a())\n"
        "m.fp32_precision = 'none'; torch.set_float32_matmul_precision('high'); seen.append(a())\n"
        "torch.set_float32_matmul_precision('highest'); seen.append(a())\n"
        "m.allow_tf32 = True; seen.append(a()); m.allow_tf32 = False; seen.append(a())\n"
        "m.fp32_precision = 'none'; torch.backends.fp32_precision = 'tf32'; seen.append(a())\n"
        "print(seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[False, True, False, True, False, True, False, True]"


def test_auto_runs_float32_matmul_ops_on_torch_unless_tf32_is_allowed(tf32):
    for op in backends.TENSOR_CORE_OPS:
        tf32(False)
        assert backends.resolve(op, CUDA, dtype=torch.float32)[0] == "torch"
        assert backends.resolve(op, CUDA, dtype=torch.bfloat16)[0] == "triton"  # 16-bit: tensor cores anyway
        tf32(True)
        assert backends.resolve(op, CUDA, dtype=torch.float32)[0] == "triton"
    tf32(False)
    for op in ("film", "conditional_layer_norm"):  # no matmul: float32 stays exact in the kernels
        assert backends.resolve(op, CUDA, dtype=torch.float32)[0] == "triton"


def test_named_triton_raises_for_float32_cuda_matmuls_without_tf32(tf32):
    tf32(False)
    with camtl.use_backend("triton"):
        for op in backends.TENSOR_CORE_OPS:
            with pytest.raises(camtl.BackendUnavailableError, match=r"TF32.*fp32_precision = 'tf32'") as info:
                backends.resolve(op, CUDA, dtype=torch.float32)
            assert op in str(info.value)
            assert backends.resolve(op, CUDA, dtype=torch.float16)[0] == "triton"
        # The interpreter (CPU tensors) multiplies float32 exactly: no TF32 needed.
        assert backends.resolve("film_linear", torch.device("cpu"), dtype=torch.float32)[0] == "triton"
        tf32(True)
        assert backends.resolve("film_linear", CUDA, dtype=torch.float32)[0] == "triton"


@pytest.mark.parametrize("requested, allowed, path", [
    ("auto", True, "TF32 tensor cores (triton)"), ("auto", False, "torch backend"),
    ("triton", True, "TF32 tensor cores (triton)"), ("triton", False, "error"), ("torch", True, "torch backend"),
])
def test_info_says_which_path_float32_cuda_takes(requested, allowed, path, tf32, capsys):
    tf32(allowed)
    with camtl.use_backend(requested):
        data = camtl.info()
    text = capsys.readouterr().out
    fp32 = data["float32_cuda"]
    assert fp32["path"] == path and fp32["ops"] == list(backends.TENSOR_CORE_OPS)
    if requested != "torch":
        assert ("torch allows TF32" if allowed else "torch does not allow TF32") in fp32["reason"]
        if fp32["path"] == "TF32 tensor cores (triton)":  # above head dim 128, fp32 attention stays on torch
            assert "up to head dim 128" in fp32["reason"]
    lines = text.splitlines()
    at = [i for i, row in enumerate(lines) if row.startswith("float32 CUDA")]
    assert at and lines[at[0]].endswith(f"run on: {path}") and fp32["reason"] in lines[at[0] + 1]


def test_gpus_older_than_ampere_run_the_torch_backend(monkeypatch):
    """On a pre-Ampere GPU (a T4 is sm_75) auto picks torch for every op, and a named kernel backend says why it
    cannot run, instead of launching kernels tiled for sm_80's shared memory (or bf16 it lacks)."""
    from camtl import backends

    monkeypatch.setattr(backends, "_cuda_capability", lambda: (7, 5))
    backends.backend_state.cache_clear()
    monkeypatch.setattr(backends, "backend_state", lambda name: backends.BackendState(
        name, True, "stand-in", tuple(backends.implemented_ops("triton"))))
    for op in ("film", "conditional_layer_norm", "conditional_attention"):
        assert backends.resolve(op, CUDA, dtype=torch.bfloat16)[0] == "torch"
        with camtl.use_backend("triton"), pytest.raises(backends.BackendUnavailableError,
                                                        match=r"compute capability 8\.0 or newer.*sm_75"):
            backends.resolve(op, CUDA, dtype=torch.bfloat16)
    monkeypatch.setattr(backends, "_cuda_capability", lambda: (8, 0))
    assert backends.resolve("film", CUDA, dtype=torch.bfloat16)[0] == "triton"


def test_info_says_a_pre_ampere_gpu_runs_no_fused_kernel(monkeypatch):
    from camtl import backends

    monkeypatch.setattr(backends, "_cuda_capability", lambda: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backends.backend_state.cache_clear()
    try:
        state = backends.backend_state("triton")
        assert state.available is False and "sm_70" in state.reason, state
    finally:
        backends.backend_state.cache_clear()
