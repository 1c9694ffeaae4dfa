"""The mutation runner (scripts/mutate.py) on a toy tree, and the project's mutant list against this tree."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutate = _load("camtl_mutate_runner", ROOT / "scripts" / "mutate.py")

TOY_SOURCE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
TOY_TESTS = ("from toy.ops import add, sub\n\n\n"
             "def test_add():\n    assert add(2, 3) == 5\n\n\n"
             "def test_sub():\n    assert sub(5, 3) in (2, 8)  # too weak: a + for - survives\n")


def _write_mutants(path, entries):
    lines = ["import sys", "sys.path.insert(0, %r)" % str(ROOT / "scripts"), "from mutants import Mutant",
             "MUTANTS = ["] + [f"    Mutant(*{entry!r})," for entry in entries] + ["]"]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def toy(tmp_path):
    """A git tree: toy/ops.py, its tests, an ignored file and an untracked one."""
    tree = tmp_path / "tree"
    (tree / "toy").mkdir(parents=True)
    (tree / "tests").mkdir()
    (tree / "toy" / "__init__.py").write_text("")
    (tree / "toy" / "ops.py").write_text(TOY_SOURCE)
    (tree / "tests" / "test_ops.py").write_text(TOY_TESTS)
    (tree / ".gitignore").write_text("ignored.txt\n")
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    subprocess.run(["git", "add", "."], cwd=tree, check=True)
    (tree / "ignored.txt").write_text("not copied")
    (tree / "untracked.txt").write_text("copied")
    return tree


def test_verdicts_and_the_tree_is_never_modified(toy, tmp_path, capsys):
    mutants = tmp_path / "mutants.py"
    _write_mutants(mutants, [
        ("X1", "toy/ops.py", "return a + b", "return a * b", "add multiplies", "tests/test_ops.py -k add"),
        ("X2", "toy/ops.py", "return a - b", "return a + b", "sub adds", "tests/test_ops.py -k sub"),
        ("X3", "toy/ops.py", "def add(a, b):", "def add(a, b)", "a syntax error", "tests/test_ops.py"),
        ("X4", "toy/ops.py", "return a + b", "import time; time.sleep(300)", "hangs", "tests/test_ops.py -k add"),
    ])
    out = tmp_path / "results.json"
    before = (toy / "toy" / "ops.py").stat().st_mtime_ns
    rc = mutate.main(["--root", str(toy), "--mutants", str(mutants), "--out", str(out), "--timeout", "20",
                      "--jobs", "2"])
    assert rc == 1  # X2 survived
    records = {r["id"]: r for r in json.loads(out.read_text())["mutants"]}
    assert {i: r["verdict"] for i, r in records.items()} == {"X1": "caught", "X2": "survived", "X3": "error",
                                                             "X4": "timeout"}
    assert records["X1"]["failed"] == ["FAILED tests/test_ops.py::test_add - assert 6 == 5"]
    printed = capsys.readouterr().out
    assert "4 mutants: 1 caught, 1 error, 1 timeout, 1 survived; score 75%" in printed
    assert (toy / "toy" / "ops.py").read_text() == TOY_SOURCE
    assert (toy / "toy" / "ops.py").stat().st_mtime_ns == before  # mutated in the copies only, not in place


def test_only_caught_mutants_exit_zero_and_copy_skips_ignored_files(toy, tmp_path):
    mutants = tmp_path / "mutants.py"
    _write_mutants(mutants, [
        ("X1", "toy/ops.py", "return a + b", "return a * b", "add multiplies", "tests/test_ops.py -k add"),
        ("X2", "toy/ops.py", "return a - b", "return a + b", "sub adds", "tests/test_ops.py -k sub"),
    ])
    assert mutate.main(["--root", str(toy), "--mutants", str(mutants), "--out", str(tmp_path / "r.json"),
                        "--only", "X1"]) == 0
    copy = tmp_path / "copy"
    mutate.copy_tree(toy, copy)
    assert (copy / "untracked.txt").is_file() and (copy / "toy" / "ops.py").is_file()
    assert not (copy / "ignored.txt").exists()


def test_a_failing_baseline_gives_no_verdict(toy, tmp_path):
    (toy / "tests" / "test_ops.py").write_text(TOY_TESTS + "\n\ndef test_broken():\n    assert False\n")
    mutants = tmp_path / "mutants.py"
    _write_mutants(mutants, [("X1", "toy/ops.py", "return a + b", "return a * b", "add multiplies",
                              "tests/test_ops.py")])
    out = tmp_path / "results.json"
    assert mutate.main(["--root", str(toy), "--mutants", str(mutants), "--out", str(out)]) == 1
    (record,) = json.loads(out.read_text())["mutants"]
    assert record["verdict"] == "baseline"


@pytest.mark.parametrize("original,words", [("return a * b", "not found"), ("return a", "found 2 times")])
def test_a_stale_or_ambiguous_snippet_fails_loudly(toy, tmp_path, capsys, original, words):
    mutants = tmp_path / "mutants.py"
    _write_mutants(mutants, [("X9", "toy/ops.py", original, "pass", "stale", "tests/test_ops.py")])
    assert mutate.main(["--root", str(toy), "--mutants", str(mutants), "--list"]) == 2
    assert mutate.main(["--root", str(toy), "--mutants", str(mutants), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "X9" in err and words in err and "stale" in err
    assert not (tmp_path / "r.json").exists()


def test_the_project_list_matches_this_tree():
    """Every listed snippet occurs exactly once: a refactor of a mutated line must update scripts/mutants.py."""
    mutants = mutate.load_mutants(ROOT / "scripts" / "mutants.py")
    mutate.check_mutants(mutants, ROOT)
    ids = {m.id for m in mutants}
    assert {"A3", "A14", "L3", "L7", "M1", "T1", "T2"} <= ids  # the ones issue 14 names
    assert len(ids) >= 27


def test_the_copy_must_import_its_own_kernels(tmp_path):
    copy = tmp_path / "copy"
    mutate.copy_tree(ROOT, copy)
    mutate.check_imports_own_kernels(sys.executable, copy)
    init = copy / "camtl" / "__init__.py"
    init.write_text(init.read_text().replace("\n_bind_source_tree_kernels()\n", "\n"))
    with pytest.raises(RuntimeError, match="outside itself|failed"):
        mutate.check_imports_own_kernels(sys.executable, copy)
