"""The wheel: pure Python without the CUDA build, kernels/ installed as camtl.kernels, torch never pinned."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_without_cuda_build(tmp_path):
    env = dict(os.environ, CAMTL_SKIP_CUDA_BUILD="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, env=env, capture_output=True)
    (wheel,) = tmp_path.glob("camtl-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(zf.read(n).decode() for n in names if n.endswith("METADATA"))
    for module in ("camtl/kernels/__init__.py", "camtl/nn.py", "camtl/ops/attention.py", "camtl/backends/torch_ref.py"):
        assert module in names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires == ["Requires-Dist: torch>=2.6"], requires
