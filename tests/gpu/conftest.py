"""GPU-only checks, run by `make gpu-check`. Without a CUDA device they fail: a skipped test is not a pass."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/conftest.py helpers


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests/gpu needs a CUDA device visible to torch (run them with `make gpu-check`)")
