"""The wheel: pure Python without the CUDA build, kernels/ installed as camtl.kernels, torch never pinned."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Prints where camtl, camtl.kernels and one kernel module come from, and whether a top-level `kernels` got imported.
WHERE = ("import sys, camtl, camtl.kernels.film as film; "
         "print(camtl.__file__, camtl.kernels.__file__, film.__file__, 'kernels' in sys.modules)")


def _import_from(path, cwd):
    """Runs WHERE in a fresh interpreter with PYTHONPATH=path; returns its four printed fields."""
    env = dict(os.environ, PYTHONPATH=str(path))
    out = subprocess.run([sys.executable, "-c", WHERE], check=True, env=env, cwd=cwd, capture_output=True, text=True)
    return out.stdout.split()


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
    # Installed: camtl/kernels is the wheel's own, even beside a source-tree look-alike (setup.py + kernels/).
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    (site / "setup.py").write_text("")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("raise ImportError('the decoy kernels/ was imported')")
    camtl_file, kernels_file, film_file, top_level = _import_from(site, tmp_path)
    assert Path(kernels_file) == site / "camtl" / "kernels" / "__init__.py"
    assert Path(film_file) == site / "camtl" / "kernels" / "film.py"
    assert top_level == "False"


def test_source_tree_copy_imports_its_own_kernels(tmp_path):
    """A copy of the tree on PYTHONPATH runs the copy's kernels/, not those of the checkout installed editable."""
    copy = tmp_path / "clone"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("camtl", "kernels"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=ignore)
    shutil.copy(ROOT / "setup.py", copy / "setup.py")
    camtl_file, kernels_file, film_file, top_level = _import_from(copy, tmp_path)
    assert Path(camtl_file) == copy / "camtl" / "__init__.py"
    assert Path(kernels_file) == copy / "kernels" / "__init__.py"
    assert Path(film_file) == copy / "kernels" / "film.py"
    assert top_level == "False"  # only camtl.kernels is bound; an unrelated top-level `kernels` stays free


def test_pure_wheel_drops_a_stale_extension_from_build_lib(tmp_path):
    """An earlier CUDA build leaves camtl/_C*.so in build/lib; the pure wheel (tagged py3-none-any) must not ship it."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True, text=True).stdout
    copy = tmp_path / "src"
    for rel in filter(None, listing.split("\0")):
        if (ROOT / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, copy / rel)
    stale = copy / "build" / "lib" / "camtl" / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x7fELF left by an earlier CUDA build")
    env = dict(os.environ, CAMTL_SKIP_CUDA_BUILD="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheels"), str(copy)], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "wheels").glob("camtl-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        binaries = [n for n in zf.namelist() if n.endswith(".so")]
    assert binaries == []
