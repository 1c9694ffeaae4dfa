"""camtl: fused kernels and exact drop-in modules for CA-MTL (Pilault, Elhattami and Pal, ICLR 2021).

- ``camtl.nn``: drop-in modules with the published names, arguments and state-dict keys;
- ``camtl.ops``: functional, autograd-capable ops;
- ``camtl.use_backend`` / ``CAMTL_BACKEND``: choose torch, triton or cuda (or auto);
- ``camtl.info()``: versions, backends and the device.
"""

__version__ = "0.1.0"


def _bind_source_tree_kernels() -> None:
    """In a source tree, make ``camtl.kernels`` this tree's ``kernels/``.

    An editable install maps ``camtl.kernels`` to the ``kernels/`` of the
    checkout it was made in, so a clone imported through PYTHONPATH (another
    worktree, the mutation runner's copy) would silently run that checkout's
    kernels instead of its own. An installed wheel has ``camtl/kernels/`` and
    is left alone; only ``camtl.kernels`` is bound, never a top-level ``kernels``.
    """
    import importlib.util
    import os
    import sys

    package_dir = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.dirname(package_dir)
    kernels_dir = os.path.join(tree, "kernels")
    if ("camtl.kernels" in sys.modules or os.path.isdir(os.path.join(package_dir, "kernels"))
            or not os.path.isfile(os.path.join(tree, "setup.py"))
            or not os.path.isfile(os.path.join(kernels_dir, "__init__.py"))):
        return
    spec = importlib.util.spec_from_file_location("camtl.kernels", os.path.join(kernels_dir, "__init__.py"),
                                                  submodule_search_locations=[kernels_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["camtl.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["camtl.kernels"]
        raise
    globals()["kernels"] = module


_bind_source_tree_kernels()

from camtl import ops  # noqa: E402
from camtl.backends import BackendUnavailableError, backend_states, use_backend  # noqa: E402
from camtl.info import info  # noqa: E402

__all__ = ["ops", "nn", "use_backend", "backend_states", "BackendUnavailableError", "info", "__version__"]


def __getattr__(name):
    if name == "nn":  # keep `import camtl` light; nn pulls torch.nn modules
        import importlib

        return importlib.import_module("camtl.nn")
    raise AttributeError(f"module 'camtl' has no attribute {name!r}")
