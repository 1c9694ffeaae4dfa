"""Backend registry and selection.

Backends:
- ``torch``: the pure-PyTorch reference (``camtl.backends.torch_ref``), always
  available, every device and dtype;
- ``triton``: fused Triton kernels (``camtl.kernels``), for CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``;
- ``cuda``: the CUDA C++ extension ``camtl._C``, for CUDA tensors.

Choice: ``CAMTL_BACKEND=auto|torch|triton|cuda`` or ``with camtl.use_backend(name)``.
``auto`` takes the first of triton, cuda, torch (cuda comes after triton until its
kernels have run on a GPU) that implements the op for the tensors'
device. A backend asked for by name runs every op it implements; the ops it
does not implement at all (``camtl info`` lists them) run on torch. If it is
unavailable, or cannot run an op it implements on the given tensors or
arguments, it raises :class:`BackendUnavailableError` saying why; it never
falls back silently.

float32 on CUDA: the Triton kernels that multiply matrices (``TENSOR_CORE_OPS``:
conditional attention and the bottleneck's down-projection) run float32 on
TF32 tensor cores, never on plain FMAs. They take float32 CUDA inputs only
when torch allows TF32 for float32 matmuls (:func:`tf32_matmul_allowed`);
otherwise ``auto`` runs those ops on the torch backend (which then multiplies
in full float32, as torch is told), and ``triton`` asked for by name raises
:class:`BackendUnavailableError` saying how to allow TF32. The other Triton
kernels (FiLM, the layer norm) compute float32 exactly and are not affected.
``camtl info`` says which path float32 CUDA inputs take now.
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
# What ``auto`` tries, in order. cuda after triton until its kernels have run on a GPU (make gpu-check): code
# that never ran is not the default.
_AUTO_ORDER = ("triton", "cuda", "torch")

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


# Ops whose Triton kernels multiply matrices (tl.dot): on float32 CUDA inputs they use TF32 tensor cores.
TENSOR_CORE_OPS: Tuple[str, ...] = ("conditional_attention", "film_linear")
_ALLOW_TF32 = "torch.backends.cuda.matmul.fp32_precision = 'tf32'"


def tf32_matmul_allowed() -> bool:
    """Whether torch allows TF32 tensor cores for float32 matmuls on CUDA (what cuBLAS would do).

    torch >= 2.9 keeps this in ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none":
    not set, i.e. no TF32); ``torch.backends.fp32_precision``, and the legacy ``allow_tf32`` and
    ``torch.set_float32_matmul_precision("high")``, set it too. Reading the legacy flags raises once the new
    API was used, so only the new one is read. Older torch: ``torch.backends.cuda.matmul.allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9: no fp32_precision
        return bool(matmul.allow_tf32)


def _tf32_precision_setting() -> str:
    """The setting tf32_matmul_allowed reads, as the user would write it."""
    matmul = torch.backends.cuda.matmul
    try:
        return f"torch.backends.cuda.matmul.fp32_precision is {matmul.fp32_precision!r}"
    except AttributeError:
        return f"torch.backends.cuda.matmul.allow_tf32 is {bool(matmul.allow_tf32)}"


def float32_tensor_core_problem(op: str, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why the Triton kernels of ``op`` must not take inputs of ``dtype`` on ``device_type``, or None.

    float32 CUDA inputs of the TENSOR_CORE_OPS need torch to allow TF32: the kernels would multiply on
    TF32 tensor cores, where torch was told to multiply in full float32.
    """
    if dtype != torch.float32 or device_type != "cuda" or op not in TENSOR_CORE_OPS or tf32_matmul_allowed():
        return None
    return (f"its kernels multiply float32 on TF32 tensor cores, and torch does not allow TF32 for float32 "
            f"matmuls ({_tf32_precision_setting()}); set {_ALLOW_TF32} to allow it, or use the torch backend")


@dataclass(frozen=True)
class BackendState:
    name: str
    available: bool
    reason: str  # why it is off, or what it runs on when on
    ops: Tuple[str, ...]  # the ops it implements


def _triton_missing() -> Optional[str]:
    """Why the Triton kernels cannot run on any device (triton or camtl.kernels do not import), or None."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton does not import: {exc}"
    try:
        importlib.import_module("camtl.kernels")
    except Exception as exc:
        return f"camtl.kernels does not import: {exc}"
    if not implemented_ops("triton"):
        return "no Triton kernels are implemented yet (issues #3, #4)"
    return None


def _triton_state() -> BackendState:
    missing = _triton_missing()
    if missing is not None:
        return BackendState("triton", False, missing, ())
    ops = implemented_ops("triton")
    if torch.cuda.is_available():
        old_gpu = _old_gpu()
        return BackendState("triton", old_gpu is None, old_gpu or "CUDA tensors", ops)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendState("triton", True, "CPU tensors under TRITON_INTERPRET=1", ops)
    return BackendState("triton", False, "no CUDA device, and TRITON_INTERPRET=1 is not set", ops)


def _cuda_state() -> BackendState:
    try:
        ext = importlib.import_module("camtl._C")
    except Exception as exc:
        return BackendState(
            "cuda", False,
            f"the CUDA extension camtl._C is not built ({type(exc).__name__}: {exc}); install camtl where nvcc is "
            "found (setup.py builds it, CAMTL_CUDA_ARCHS picks the GPUs)", (),
        )
    built = f"camtl._C built for {getattr(ext, 'ARCHS', '?')}"
    ops = implemented_ops("cuda")
    if not ops:
        return BackendState("cuda", False, f"{built}, but it implements no ops", ())
    if not torch.cuda.is_available():
        return BackendState("cuda", False, f"no CUDA device is visible to torch ({built})", ops)
    old_gpu = _old_gpu()
    return BackendState("cuda", old_gpu is None, f"{old_gpu or 'CUDA tensors'} ({built})", ops)


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


# The fused kernels' floor: Ampere (bf16 tensor cores, and the tiles' shared memory; camtl._C is built for sm_80+).
MIN_CAPABILITY = (8, 0)


def _cuda_capability() -> Optional[Tuple[int, int]]:
    """The compute capability of the current CUDA device (the one new CUDA tensors go to); None without CUDA (a
    device descriptor asked about on a CPU machine)."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _old_gpu() -> Optional[str]:
    """Why the current CUDA device is too old for the fused kernels, or None."""
    capability = _cuda_capability()
    if capability is None or capability >= MIN_CAPABILITY:
        return None
    return (f"its kernels need a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"(bf16, tile sizes, shared memory), this one is sm_{capability[0]}{capability[1]}")


def _runs_on(state: BackendState, op: str, device: torch.device,
             dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if the backend can run ``op`` on ``device`` with inputs of ``dtype``, else the reason it cannot."""
    if not state.available:
        return state.reason
    if op not in state.ops:
        return f"it does not implement {op!r} (it implements {', '.join(state.ops) or 'nothing'})"
    if state.name == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors only, got {device.type} tensors"
    if state.name in ("triton", "cuda") and device.type == "cuda" and _old_gpu() is not None:
        return _old_gpu()
    if state.name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {device.type} tensors"
    if state.name == "triton":
        return float32_tensor_core_problem(op, device.type, dtype)
    return None


def resolve(op: str, device: torch.device, reference_only: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> Tuple[str, Callable]:
    """The backend name and function that run ``op`` for tensors on ``device``.

    reference_only: why these arguments need the torch reference (inputs the
    kernels do not take), or None. Then auto picks torch, and a named backend raises.
    dtype: the inputs' dtype. float32 CUDA inputs of the TENSOR_CORE_OPS go to
    the Triton kernels only when torch allows TF32 (see the module docstring).
    None skips that check here; a float32 CUDA launch without TF32 then raises
    in the kernel (camtl.kernels._common.require_tf32), so ops should pass it.
    """
    name = _resolve_name(op, device.type, reference_only, dtype)
    return name, _IMPLS[op][name]


# Under torch.compile the choice is made once, while tracing, and baked into the graph.
@torch.compiler.assume_constant_result
def _resolve_name(op: str, device_type: str, reference_only: Optional[str],
                  dtype: Optional[torch.dtype] = None) -> str:
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
        why_not = _runs_on(state, op, device, dtype)
        if why_not is not None:
            raise BackendUnavailableError(f"camtl backend {name!r} cannot run {op!r}: {why_not}")
        return name
    for candidate in _AUTO_ORDER:
        # The interpreter is for testing, never the fast choice for CPU tensors.
        if candidate != "torch" and device.type != "cuda":
            continue
        if _runs_on(backend_state(candidate), op, device, dtype) is None:
            return candidate
    raise AssertionError("unreachable: the torch backend runs everything")


def float32_cuda_path() -> Tuple[str, str]:
    """(path, why): what float32 CUDA inputs of the TENSOR_CORE_OPS would run on now, on a CUDA machine.

    path is "TF32 tensor cores (triton)", "torch backend" or "error" (triton asked for by name
    while torch does not allow TF32). It follows the dispatch rules of ``resolve`` for the requested
    backend, assuming a CUDA device (so that it can be read on any machine).
    """
    requested = requested_backend()
    if requested not in ("auto", "triton"):
        return f"{requested} backend", f"the {requested} backend is requested (CAMTL_BACKEND / camtl.use_backend)"
    missing = _triton_missing()
    if missing is not None:
        if requested == "triton":
            return "error", f"the triton backend is requested but cannot run: {missing}"
        return "torch backend", f"the triton backend cannot run: {missing}"
    if tf32_matmul_allowed():
        return "TF32 tensor cores (triton)", (f"torch allows TF32 for float32 matmuls ({_tf32_precision_setting()}); "
                                              f"conditional_attention up to head dim 128, the torch backend above")
    why = (f"torch does not allow TF32 for float32 matmuls ({_tf32_precision_setting()}); "
           f"set {_ALLOW_TF32} to run them on the Triton kernels' TF32 tensor cores")
    if requested == "triton":
        return "error", f"the triton backend, asked for by name, raises BackendUnavailableError: {why}"
    return "torch backend", why


