"""Backend registry and selection.

Backends:
- ``torch``: the pure-PyTorch reference (``camtl.backends.torch_ref``), always
  available, every device and dtype;
- ``triton``: fused Triton kernels (``camtl.kernels``), for CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``;
- ``cuda``: the CUDA C++ extension ``camtl._C``, for CUDA tensors.

Choice: ``CAMTL_BACKEND=auto|torch|triton|cuda`` or ``with camtl.use_backend(name)``.
``auto`` takes the fastest backend that implements the op for the tensors'
device. A backend asked for by name runs every op it implements; the ops it
does not implement at all (``camtl info`` lists them) run on torch. If it is
unavailable, or cannot run an op it implements on the given tensors or
arguments, it raises :class:`BackendUnavailableError` saying why; it never
falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

BACKEND_NAMES: Tuple[str, ...] = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKEND_NAMES
# Fastest first: what ``auto`` tries.
_AUTO_ORDER = ("cuda", "triton", "torch")

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("camtl_backend", default=None)
# op name -> backend name -> the function that runs it (same signature as the torch reference).
_IMPLS: Dict[str, Dict[str, Callable]] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Declares that ``backend`` runs ``op`` with ``fn`` (called by the op modules at import)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = fn
    backend_state.cache_clear()


def implemented_ops(backend: str) -> Tuple[str, ...]:
    import camtl.ops  # noqa: F401  (the op modules register their implementations)

    return tuple(op for op, impls in _IMPLS.items() if backend in impls)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run the op here."""


@dataclass(frozen=True)
class BackendState:
    name: str
    available: bool
    reason: str  # why it is off, or what it runs on when on
    ops: Tuple[str, ...]  # the ops it implements


def _triton_state() -> BackendState:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return BackendState("triton", False, f"triton does not import: {exc}", ())
    try:
        importlib.import_module("camtl.kernels")
    except Exception as exc:
        return BackendState("triton", False, f"camtl.kernels does not import: {exc}", ())
    ops = implemented_ops("triton")
    if not ops:
        return BackendState("triton", False, "no Triton kernels are implemented yet (issues #3, #4)", ())
    if torch.cuda.is_available():
        return BackendState("triton", True, "CUDA tensors", ops)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendState("triton", True, "CPU tensors under TRITON_INTERPRET=1", ops)
    return BackendState("triton", False, "no CUDA device, and TRITON_INTERPRET=1 is not set", ops)


def _cuda_state() -> BackendState:
    try:
        ext = importlib.import_module("camtl._C")
    except Exception as exc:
        return BackendState(
            "cuda", False,
            f"the CUDA extension camtl._C is not built ({type(exc).__name__}: {exc}); "
            "no CUDA kernels are implemented yet", (),
        )
    ops = implemented_ops("cuda")
    if not ops:
        return BackendState("cuda", False, "camtl._C implements no ops yet", ())
    if not torch.cuda.is_available():
        return BackendState("cuda", False, "no CUDA device is visible to torch", ops)
    return BackendState("cuda", True, "CUDA tensors", ops)


@functools.lru_cache(maxsize=None)
def backend_state(name: str) -> BackendState:
    """The state of one backend (cached: availability does not change in a process)."""
    if name == "torch":
        return BackendState("torch", True, "every device and dtype", implemented_ops("torch"))
    if name == "triton":
        return _triton_state()
    if name == "cuda":
        return _cuda_state()
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def backend_states() -> Dict[str, BackendState]:
    return {name: backend_state(name) for name in BACKEND_NAMES}


def requested_backend() -> str:
    """The backend asked for now: ``use_backend`` first, then ``CAMTL_BACKEND``, else auto."""
    name = _override.get()
    if name is None:
        name = os.environ.get("CAMTL_BACKEND", "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"CAMTL_BACKEND={name!r} is not a backend; expected one of {_CHOICES}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (or ``"auto"``)."""
    name = name.strip().lower()
    if name not in _CHOICES:
        raise ValueError(f"use_backend: name must be one of {_CHOICES}, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _runs_on(state: BackendState, op: str, device: torch.device) -> Optional[str]:
    """None if the backend can run ``op`` on ``device``, else the reason it cannot."""
    if not state.available:
        return state.reason
    if op not in state.ops:
        return f"it does not implement {op!r} (it implements {', '.join(state.ops) or 'nothing'})"
    if state.name == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors only, got {device.type} tensors"
    if state.name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device.type} tensors"
    return None


def resolve(op: str, device: torch.device, reference_only: Optional[str] = None) -> Tuple[str, Callable]:
    """The backend name and function that run ``op`` for tensors on ``device``.

    reference_only: why these arguments need the torch reference (inputs the
    kernels do not take), or None. Then auto picks torch, and a named backend raises.
    """
    name = _resolve_name(op, device.type, reference_only)
    return name, _IMPLS[op][name]


# Under torch.compile the choice is made once, while tracing, and baked into the graph.
@torch.compiler.assume_constant_result
def _resolve_name(op: str, device_type: str, reference_only: Optional[str]) -> str:
    name = requested_backend()
    if reference_only is not None and name not in ("auto", "torch"):
        raise BackendUnavailableError(f"camtl backend {name!r} cannot run {op!r}: {reference_only}; "
                                      f"only the torch backend can")
    if reference_only is not None:
        return "torch"
    device = torch.device(device_type)
    if name != "auto":
        state = backend_state(name)
        if state.available and op not in state.ops:
            return "torch"  # documented: a backend runs the ops it implements
        why_not = _runs_on(state, op, device)
        if why_not is not None:
            raise BackendUnavailableError(f"camtl backend {name!r} cannot run {op!r}: {why_not}")
        return name
    for candidate in _AUTO_ORDER:
        # The interpreter is for testing, never the fast choice for CPU tensors.
        if candidate != "torch" and device.type != "cuda":
            continue
        if _runs_on(backend_state(candidate), op, device) is None:
            return candidate
    raise AssertionError("unreachable: the torch backend runs everything")


