"""GPU-only checks, run by `make gpu-check`. Without a CUDA device they fail: a skipped test is not a pass.

They collect on any machine (`pytest --collect-only tests/gpu`), so a broken import shows before a GPU is lent.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# tests/conftest.py's helpers under a name of their own: pytest imports both conftest files as "conftest",
# so `from conftest import ...` here would find this file.
_spec = importlib.util.spec_from_file_location("camtl_test_helpers", Path(__file__).resolve().parents[1] / "conftest.py")
camtl_test_helpers = importlib.util.module_from_spec(_spec)
sys.modules["camtl_test_helpers"] = camtl_test_helpers
_spec.loader.exec_module(camtl_test_helpers)
# The CPU test modules that the GPU tests reuse do `from conftest import ...`; here that finds this file.
globals().update({name: value for name, value in vars(camtl_test_helpers).items()
                  if not name.startswith("_") and type(value).__name__ != "FixtureFunctionDefinition" and not hasattr(value, "_pytestfixturefunction")
                  and name not in ("pytest", "torch", "sys", "os")})


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() and not config.option.collectonly:
        raise pytest.UsageError("tests/gpu needs a CUDA device visible to torch (run them with `make gpu-check`)")
