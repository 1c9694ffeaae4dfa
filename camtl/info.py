"""``camtl.info()`` / ``camtl info``: versions, backends and their state, the device."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any, Dict


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # not installed, or broken
        return f"not importable ({type(exc).__name__})"


def collect() -> Dict[str, Any]:
    """Everything ``info`` reports, as a dict."""
    import torch

    import camtl
    from camtl.backends import TENSOR_CORE_OPS, backend_states, float32_cuda_path, requested_backend

    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        device = f"cuda:{idx} {torch.cuda.get_device_name(idx)} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}), no CUDA device visible to torch"
    try:
        requested = requested_backend()
        fp32_path, fp32_why = float32_cuda_path()
    except ValueError as exc:
        requested = f"invalid: {exc}"
        fp32_path, fp32_why = "unknown", "the requested backend is invalid"
    return {
        "camtl": camtl.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": device,
        "requested_backend": requested,
        # What float32 CUDA inputs of the matmul ops run on now (TF32 tensor cores or the torch backend), and why.
        "float32_cuda": {"ops": list(TENSOR_CORE_OPS), "path": fp32_path, "reason": fp32_why},
        "backends": {
            name: {"available": st.available, "reason": st.reason, "ops": list(st.ops)}
            for name, st in backend_states().items()
        },
        "cuda_extension": _cuda_extension(),
    }


def _cuda_extension() -> Dict[str, Any]:
    """camtl._C as built: {"built": True, "archs", "runtime", "device_status", "device_count", "device_message"},
    or {"built": False, "reason"}."""
    try:
        from camtl.backends.cuda_ext import extension_info

        return {"built": True, **extension_info()}
    except Exception as exc:  # not built, or a build that cannot load here: say why, never fail `info`
        return {"built": False, "reason": f"{type(exc).__name__}: {exc}"}


def info(file=None) -> Dict[str, Any]:
    """Prints versions, the backends with their state (and why any is off) and ops, and the device; returns them."""
    data = collect()
    out = file if file is not None else sys.stdout
    for key in ("camtl", "python", "torch", "triton", "transformers", "device"):
        print(f"{key:<14} {data[key]}", file=out)
    print(f"{'backend':<14} {data['requested_backend']} (CAMTL_BACKEND / camtl.use_backend)", file=out)
    print("backends (the ops a backend does not implement run on torch):", file=out)
    for name, st in data["backends"].items():
        state = "on " if st["available"] else "off"
        print(f"  {name:<7} {state}  {st['reason']}", file=out)
        print(f"  {'':<7}      ops: {', '.join(st['ops']) or 'none'}", file=out)
    ext = data["cuda_extension"]
    if ext["built"]:
        print(f"{'camtl._C':<14} built for {ext['archs']}, CUDA runtime {ext['runtime']}; device query: "
              f"{ext['device_count']} device(s), status {ext['device_status']} ({ext['device_message']})", file=out)
    else:
        print(f"{'camtl._C':<14} not built ({ext['reason']})", file=out)
    fp32 = data["float32_cuda"]
    print(f"{'float32 CUDA':<14} {', '.join(fp32['ops'])} run on: {fp32['path']}", file=out)
    print(f"{'':<14} {fp32['reason']}", file=out)
    return data
