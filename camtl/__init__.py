"""camtl: fused kernels and exact drop-in modules for CA-MTL (Pilault, Elhattami and Pal, ICLR 2021).

- ``camtl.nn``: drop-in modules with the published names, arguments and state-dict keys;
- ``camtl.ops``: functional, autograd-capable ops;
- ``camtl.use_backend`` / ``CAMTL_BACKEND``: choose torch, triton or cuda (or auto);
- ``camtl.info()``: versions, backends and the device.
"""

__version__ = "0.1.0"

from camtl import ops  # noqa: E402
from camtl.backends import BackendUnavailableError, backend_states, use_backend  # noqa: E402
from camtl.info import info  # noqa: E402

__all__ = ["ops", "nn", "use_backend", "backend_states", "BackendUnavailableError", "info", "__version__"]


def __getattr__(name):
    if name == "nn":  # keep `import camtl` light; nn pulls torch.nn modules
        import importlib

        return importlib.import_module("camtl.nn")
    raise AttributeError(f"module 'camtl' has no attribute {name!r}")
