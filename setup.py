"""Build script. The package metadata lives in pyproject.toml.

Layout: ``camtl/`` is the package; ``kernels/`` (Triton) installs as
``camtl.kernels``; ``csrc/`` (CUDA C++ + pybind11) builds into ``camtl._C``.

The CUDA extension is optional and torch-free (it links a static cudart and
no torch library), so one wheel serves every torch version. It is built with
nvcc through ninja when nvcc is found (PATH, CUDA_HOME or /usr/local/cuda).
Environment:
  CAMTL_SKIP_CUDA_BUILD=1   build a pure-Python wheel
  CAMTL_CUDA_ARCHS          semicolon-separated targets (default "80;86;89;90a;compute_90"):
                            "NN" or "NNa" is SASS for sm_NN(a), "compute_NN" is PTX for newer GPUs
  MAX_JOBS                  ninja's parallel jobs (default: the CPU count)
  NVCC_THREADS              nvcc --threads, per-arch parallelism inside one nvcc (default 1)
The build fails when ptxas reports a spill (stores or loads) or any warning.
`make wheel` (scripts/build_wheels.sh) builds both wheels, checks camtl._C and repairs the CUDA wheel with auditwheel.
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
DEFAULT_ARCHS = "80;86;89;90a;compute_90"


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def gencode_flags(archs):
    flags = []
    for arch in (a.strip() for a in archs.split(";") if a.strip()):
        ptx = re.fullmatch(r"compute_(\d+a?)", arch)
        sass = re.fullmatch(r"(?:sm_)?(\d+a?)", arch)
        if ptx:
            flags.append(f"-gencode=arch=compute_{ptx.group(1)},code=compute_{ptx.group(1)}")
        elif sass:
            flags.append(f"-gencode=arch=compute_{sass.group(1)},code=sm_{sass.group(1)}")
        else:
            raise SystemExit(f"CAMTL_CUDA_ARCHS: {arch!r} is not an arch (e.g. 80, 90a or compute_90)")
    if not flags:
        raise SystemExit("CAMTL_CUDA_ARCHS is empty; set CAMTL_SKIP_CUDA_BUILD=1 for a pure-Python build")
    return flags


def check_ptxas_logs(logs):
    """Fails the build on any ptxas spill or any compiler warning; returns a one-line summary."""
    problems, registers = [], []
    for log in logs:
        text = log.read_text()
        for line in text.splitlines():
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if spill and (int(spill.group(1)) or int(spill.group(2))):
                problems.append(f"{log.name}: {line.strip()}")
            if re.search(r"\bwarning\b", line, re.IGNORECASE):
                problems.append(f"{log.name}: {line.strip()}")
        registers += [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    if problems:
        raise SystemExit("camtl: the CUDA build must have no spills and no warnings:\n  " + "\n  ".join(problems))
    return f"{len(registers)} kernel builds, 0 spills, at most {max(registers, default=0)} registers"


class NinjaCudaBuild(build_ext):
    """Builds camtl._C: the .cu files with nvcc, bindings.cpp with the host compiler, through ninja."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        cudart = find_static_cudart(nvcc)
        import pybind11  # a build requirement (pyproject.toml)

        archs = os.environ.get("CAMTL_CUDA_ARCHS", DEFAULT_ARCHS)
        build = Path(self.build_temp).resolve() / "camtl_C"
        build.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "c++")
        nvcc_flags = ["-std=c++17", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings",
                      "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra,-Werror",
                      "-Xptxas", "--warn-on-spills", "-Xptxas", "-Werror",
                      f"--threads={int(os.environ.get('NVCC_THREADS', '1'))}", *gencode_flags(archs)]
        cxx_flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
                     f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                     shlex.quote(f'-DCAMTL_CUDA_ARCHS="{archs}"')]
        cu_sources = sorted(CSRC.glob("*.cu"))
        objects = [build / (src.name + ".o") for src in cu_sources] + [build / "bindings.cpp.o"]
        ninja = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"cxx = {cxx}",
            f"nvcc_flags = {' '.join(nvcc_flags)}",
            f"cxx_flags = {' '.join(cxx_flags)}",
            # ptxas -v goes to a log per object (checked below); on failure the log is shown.
            "rule nvcc\n  command = $nvcc $nvcc_flags -c $in -o $out > $out.log 2>&1 || (cat $out.log; exit 1)\n"
            "  description = nvcc $in",
            "rule cxx\n  command = $cxx $cxx_flags -c $in -o $out\n  description = c++ $in",
            # cudart static; its own symbols stay hidden so the module exports only PyInit__C.
            "rule link\n  command = $cxx -shared -o $out $in "
            f"{cudart} -lrt -lpthread -ldl -Wl,--exclude-libs,ALL\n"
            "  description = link $out",
        ]
        headers = " ".join(str(h) for h in sorted(CSRC.glob("*.h")))
        for src, obj in zip(cu_sources, objects):
            ninja.append(f"build {obj}: nvcc {src} | {headers}")
        ninja.append(f"build {objects[-1]}: cxx {CSRC / 'bindings.cpp'} | {headers}")
        ninja.append(f"build {output}: link {' '.join(str(o) for o in objects)}")
        (build / "build.ninja").write_text("\n".join(ninja) + "\n")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([ninja_binary(), "-C", str(build), "-j", jobs], check=True)
        summary = check_ptxas_logs([build / (src.name + ".o.log") for src in cu_sources])
        print(f"camtl: built camtl._C for {archs} ({summary})", file=sys.stderr)


def find_static_cudart(nvcc):
    """libcudart_static.a of nvcc's toolkit (nvcc may be a wrapper script, so ask it where it lives)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:  # `nvcc --dryrun` prints the toolkit's TOP
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True).stderr
        homes += re.findall(r"TOP=(\S+)", dry)
    except OSError:
        pass
    homes += [str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for home in filter(None, homes):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            candidate = Path(home) / lib / "libcudart_static.a"
            if candidate.exists():
                return str(candidate.resolve())
    raise SystemExit(f"camtl: libcudart_static.a not found near {nvcc}; set CUDA_HOME")


def ninja_binary():
    try:
        import ninja  # the pip package, a build requirement

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if found is None:
            raise SystemExit("camtl: building camtl._C needs ninja (pip install ninja)")
        return found


def extensions():
    if os.environ.get("CAMTL_SKIP_CUDA_BUILD", "0") == "1":
        print("camtl: CAMTL_SKIP_CUDA_BUILD=1, building pure Python (no camtl._C)", file=sys.stderr)
        return []
    if find_nvcc() is None:
        print("camtl: nvcc not found, building pure Python (no camtl._C)", file=sys.stderr)
        return []
    missing = [name for name in ("pybind11", "ninja") if importlib.util.find_spec(name) is None]
    if missing and not (missing == ["ninja"] and shutil.which("ninja")):
        # pip's build isolation installs them (pyproject.toml); --no-build-isolation uses what is installed.
        print(f"camtl: {' and '.join(missing)} not installed (pip install pybind11 ninja), building pure Python "
              "(no camtl._C)", file=sys.stderr)
        return []
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        print("camtl: Python.h not found (install the Python headers), building pure Python (no camtl._C)",
              file=sys.stderr)
        return []
    # sources/depends list csrc/ for the sdist; NinjaCudaBuild picks what it compiles itself.
    return [Extension("camtl._C", sources=_csrc("*.c*"), depends=_csrc("*.h"))]


class PureBuildPy(build_py):
    """A pure build drops the camtl._C an earlier CUDA build left in build/lib: the wheel would ship it as
    py3-none-any (bdist_wheel copies all of build/lib)."""

    def run(self):
        super().run()
        for stale in Path(self.build_lib, "camtl").glob("_C.*"):
            if stale.suffix in (".so", ".pyd"):
                stale.unlink()


def _csrc(pattern):
    return [str(p.relative_to(HERE)) for p in sorted(CSRC.glob(pattern))]


ext_modules = extensions()
setup(
    packages=find_packages(include=["camtl", "camtl.*"]) + ["camtl.kernels"],
    package_dir={"camtl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": NinjaCudaBuild} if ext_modules else {"build_py": PureBuildPy},
)
