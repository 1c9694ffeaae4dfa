"""`make wheel`'s path (scripts/build_wheels.sh): the CUDA wheel, built for sm_90a only to keep CI short (make wheel
builds every arch), installed into a fresh venv beside the CPU torch and run there; the pure wheel's tag; the
checks that refuse a camtl._C tied to torch, libpython or a shared CUDA library."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import camtl

ROOT = Path(__file__).resolve().parents[1]
ARCHS = "90a"
PY_TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"

_spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "scripts" / "build_wheels.py")
build_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_wheels)


def _nvcc():
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    candidates = [shutil.which("nvcc")] + [str(Path(h) / "bin" / "nvcc") for h in homes if h]
    return next((c for c in candidates if c and Path(c).exists()), None)


needs_nvcc = pytest.mark.skipif(
    _nvcc() is None, reason="nvcc not found, so the CUDA wheel cannot be built on this machine; CI has nvcc and "
                            "builds it (a skip here is not a pass)")


def _run(cmd, **kwargs):
    """Runs cmd; on failure the assertion shows its output."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """{'cuda': path, 'pure': path, 'venv': path} from scripts/build_wheels.sh in this venv ('pure' alone without
    nvcc). 'venv' is a fresh venv with only this venv's torch version, set up while the wheels build (2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("CAMTL_SKIP_CUDA_BUILD", "CAMTL_CUDA_ARCHS")}
    env.update(VENV=sys.prefix, PYTHON=sys.executable, WHEEL_OUT=str(out), WHEEL_ARCHS=ARCHS)
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    setup = None
    if _nvcc():
        # The exact local version of this venv's torch (2.13.0+cpu here): it can only resolve to a CPU build.
        setup = subprocess.Popen(
            f"{shlex.quote(sys.executable)} -m venv {venv} && {venv}/bin/python -m pip install -q "
            f"--disable-pip-version-check {shlex.quote('torch==' + torch.__version__)}",
            shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _run(["bash", ROOT / "scripts" / "build_wheels.sh", "--json", out / "built.json",
              *([] if setup else ["--only", "pure"])], env=env, cwd=ROOT)
    finally:
        setup_log = setup.communicate()[0] if setup else ""
    assert setup is None or setup.returncode == 0, f"the fresh venv with torch=={torch.__version__}:\n{setup_log}"
    built = {kind: Path(item["wheel"]) for kind, item in json.loads((out / "built.json").read_text()).items()}
    return dict(built, venv=venv)


def _extension(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if re.fullmatch(r"camtl/_C\.[^/]*\.so", n)]
        return Path(zf.extract(name, into))


def test_pure_wheel_is_py3_none_any(wheels):
    wheel = wheels["pure"]
    assert wheel.name == f"camtl-{camtl.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert [n for n in names if n.endswith(".so")] == []
    assert "Root-Is-Purelib: true" in meta and "Tag: py3-none-any" in meta.splitlines()


@needs_nvcc
def test_cuda_wheel_is_manylinux_and_its_extension_needs_only_glibc_and_libstdcxx(wheels, tmp_path):
    wheel = wheels["cuda"]
    assert re.fullmatch(rf"camtl-{re.escape(camtl.__version__)}-{PY_TAG}-{PY_TAG}-manylinux_2_\d+_x86_64\.whl",
                        wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert [n for n in names if ".libs/" in n] == []  # auditwheel grafted nothing
    assert "Root-Is-Purelib: false" in meta
    so = _extension(wheel, tmp_path)
    found = build_wheels.check_extension(so)  # raises on a torch/libpython/CUDA-library dependency
    assert set(found["needed"]) <= {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1",
                                    "ld-linux-x86-64.so.2", "libdl.so.2", "libpthread.so.0", "librt.so.1"}
    fatbins = build_wheels.fatbin_targets(so)  # one per .cu file, each with the SASS for sm_90a only
    assert fatbins and all(targets == {"sm_90a"} for targets in fatbins), fatbins
    dynamic = _run(["readelf", "-d", so]).stdout
    assert not re.search(r"lib(torch|c10|python|cuda|cudart|nvrtc|cublas)", dynamic)


def _compile_so(tmp_path, source: str, *link) -> Path:
    (tmp_path / "ext.c").write_text(source)
    so = tmp_path / "_C.so"
    _run(["cc", "-shared", "-fPIC", "-o", so, tmp_path / "ext.c", *link])
    return so


def test_check_extension_refuses_torch_and_shared_cuda_symbols(tmp_path):
    # Undefined c10:: and cudaMalloc symbols, as a module built against libtorch or the shared cudart would have.
    source = ("extern void _ZN3c106detail14torchCheckFailEPKcS2_jS2_(void); extern int cudaMalloc(void);\n"
              "const char *driver = \"libcuda.so.1\";\n"
              "int f(void) { _ZN3c106detail14torchCheckFailEPKcS2_jS2_(); return cudaMalloc(); }\n")
    so = _compile_so(tmp_path, source)
    with pytest.raises(SystemExit, match=r"(?s)takes the torch symbol c10::detail::torchCheckFail.*"
                                         r"takes the CUDA symbol cudaMalloc"):
        build_wheels.check_extension(so)


def test_check_extension_refuses_torch_libpython_rpath_and_a_module_without_static_cudart(tmp_path):
    # Stand-ins named as torch's and Python's libraries, linked in as a torch extension would link them.
    for name in ("torch", "c10", "python3.11"):
        _run(["cc", "-shared", "-fPIC", "-o", tmp_path / f"lib{name}.so", "-x", "c", "/dev/null"])
    so = _compile_so(tmp_path, "int f(void) { return 0; }\n", f"-L{tmp_path}", f"-Wl,-rpath,{tmp_path}",
                     "-Wl,--no-as-needed", "-ltorch", "-lc10", "-lpython3.11")
    with pytest.raises(SystemExit) as refused:
        build_wheels.check_extension(so)
    for problem in ("needs libtorch.so", "needs libc10.so", "needs libpython3.11.so", f"RUNPATH '{tmp_path}'",
                    "does not contain the static cudart"):
        assert problem in str(refused.value), str(refused.value)


@needs_nvcc
def test_cuda_wheel_in_a_fresh_venv_beside_cpu_torch_reports_its_archs_and_no_device(wheels, tmp_path):
    venv = wheels["venv"]  # a fresh venv holding only torch (and its dependencies)
    vpy = venv / "bin" / "python"
    # --no-deps: triton and transformers (Requires-Dist) are not needed to import camtl or run `camtl info`.
    _run([vpy, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", wheels["cuda"]])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CAMTL_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    probe = ("import json, camtl, camtl._C, torch\n"
             "from camtl.backends.cuda_ext import extension_info\n"
             "print(json.dumps(dict(camtl=camtl.__file__, ext=camtl._C.__file__, torch=torch.__version__,\n"
             "                      info=extension_info())))\n")
    got = json.loads(_run([vpy, "-c", probe], env=env, cwd=tmp_path).stdout)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    assert Path(got["camtl"]) == site / "camtl" / "__init__.py"  # the wheel's camtl, not this checkout's
    assert Path(got["ext"]).parent == site / "camtl"
    assert got["torch"] == torch.__version__
    ext = got["info"]
    assert ext["archs"] == ARCHS and ext["runtime"] >= 13000
    has_gpu = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"]).returncode == 0
    if not has_gpu:  # cudaGetDeviceCount answers with an error code (no driver / no device), not a crash
        assert ext["device_status"] != 0 and ext["device_count"] == 0, ext
    info = json.loads(_run([venv / "bin" / "camtl", "info", "--json"], env=env, cwd=tmp_path).stdout)
    assert info["camtl"] == camtl.__version__ and info["torch"] == torch.__version__
    cuda = info["backends"]["cuda"]
    assert cuda["available"] is False and "conditional_layer_norm" in cuda["ops"]
    assert cuda["reason"] == f"no CUDA device is visible to torch (camtl._C built for {ARCHS})", cuda
    assert info["cuda_extension"]["built"] is True and info["cuda_extension"]["archs"] == ARCHS, info["cuda_extension"]
