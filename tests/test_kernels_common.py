"""kernels/_common.py: the interpreter check that every launch's interpreting() runs."""

import pytest

from camtl.kernels import _common


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.4.6", True), ("3.5.1", "2.5.0rc1", True),
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.4.6", False), ("3.10.0", "3.0.0", False),
])
def test_interpreter_check_refuses_only_triton_before_3_7_with_numpy_2_4(triton_version, numpy_version, refused):
    if refused:
        with pytest.raises(RuntimeError, match=rf"triton {triton_version}.*numpy {numpy_version}.*numpy<2\.4"):
            _common._check_interpreter(triton_version, numpy_version)
    else:
        assert _common._check_interpreter(triton_version, numpy_version) is None


def test_interpreting_runs_the_check_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_common.triton, "__version__", "3.6.0")
    monkeypatch.setattr(_common.numpy, "__version__", "2.4.1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1: triton 3.6.0's interpreter"):
        _common.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _common.interpreting() is False
