"""Build script. The package metadata lives in pyproject.toml.

Layout: ``camtl/`` is the package; ``kernels/`` (Triton) installs as
``camtl.kernels``; ``csrc/`` (CUDA C++ + pybind11) builds into ``camtl._C``.

The CUDA extension is optional and torch-free (it links cudart only), so one
wheel serves every torch version. Environment:
  CAMTL_SKIP_CUDA_BUILD=1   build a pure-Python wheel
  CAMTL_CUDA_ARCHS          semicolon-separated archs (default "80;90a")
  MAX_JOBS, NVCC_THREADS    build parallelism
csrc/ has no sources yet (the CUDA kernels land with a later issue), so for
now every build is pure Python.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_sources():
    if os.environ.get("CAMTL_SKIP_CUDA_BUILD", "0") == "1":
        return []
    return sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu")))


if cuda_sources():  # pragma: no cover - no CUDA sources yet
    raise SystemExit("csrc/ has CUDA sources but setup.py does not build them yet; set CAMTL_SKIP_CUDA_BUILD=1")

setup(
    packages=find_packages(include=["camtl", "camtl.*"]) + ["camtl.kernels"],
    package_dir={"camtl.kernels": "kernels"},
)
