"""tests/gpu must collect on a CPU machine, so a broken import shows before a GPU is lent."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_tests_collect_without_a_gpu():
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/gpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    collected = [line for line in run.stdout.splitlines() if line.startswith("tests/gpu/") and "::" in line]
    files = {line.split("::")[0] for line in collected}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("test_*.py")}
    assert files == expected, f"not collected: {sorted(expected - files)}"
