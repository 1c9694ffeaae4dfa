# make test   - create .venv, install, run the CPU test suite (Triton kernels under the interpreter)
# make bench  - create .venv, install, run the benchmark suite (pytest benchmarks/) on this machine's device:
#               results.json/.csv, summary.md/.png in $(BENCH_OUT); BENCH_ARGS="--quick" or "-m epoch";
#               BENCH_SAVE=name keeps the run under that name
# make bench-compare A=name B=name - every row's ratio between two saved runs, marking what moved beyond the noise
# make mutate - create .venv, install, run the listed mutants (scripts/mutants.py) against their tests; MUTATE_ARGS="--only A3 --jobs 2"
# make kernel-report - CPU only: compile every shipped kernel configuration for sm_90a and sm_80; registers, spills,
#                      smem, tensor-core op, main-loop SASS size into $KERNEL_REPORT_OUT/kernel-report.json
# make gpu-check - on a CUDA machine (preinstalled torch/triton, offline), within 7 minutes: tests/gpu, the benchmarks
#                  and the kernel report into $GPU_CHECK_OUT, with summary.md (scripts/gpu_check.py)
# make wheel - into $WHEEL_OUT (dist/): camtl-<v>-cp<py>-cp<py>-manylinux_<glibc>_x86_64.whl (camtl._C for every
#              default arch; WHEEL_ARCHS=90a for a quick build), checked and repaired by auditwheel, and the pure
#              camtl-<v>-py3-none-any.whl; PYTHON=python3.12 builds for that Python (scripts/build_wheels.sh)
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
BENCH_OUT ?= .benchmarks/latest
KERNEL_REPORT_OUT ?= .benchmarks/kernel-report
export GPU_CHECK_OUT ?= gpu-check-out
WHEEL_OUT ?= dist

.PHONY: test bench bench-compare mutate kernel-report gpu-check wheel venv clean

venv: $(VENV)/.camtl-installed

$(VENV)/.camtl-installed: setup.py pyproject.toml scripts/bootstrap.sh $(wildcard csrc/*)
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/bootstrap.sh
	touch $@

test: venv
	TRITON_INTERPRET=1 $(VPY) -m pytest tests

bench: venv
	BENCH_SAVE="$(BENCH_SAVE)" $(VPY) -m pytest benchmarks --bench-out $(BENCH_OUT) $(BENCH_ARGS)

bench-compare: venv
	$(VPY) benchmarks/compare.py $(A) $(B)

mutate: venv
	$(VPY) scripts/mutate.py $(MUTATE_ARGS)

kernel-report: venv
	$(VPY) scripts/kernel_report.py --out $(KERNEL_REPORT_OUT) $(KERNEL_REPORT_ARGS)

gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT)

# The default python3 builds in .venv, created as for the other targets when missing (an existing one is not
# reinstalled: the wheels are built from a fresh copy of the tree); another PYTHON in a build-only venv.
wheel:
	@if [ "$(PYTHON)" = python3 ] && [ ! -x $(VENV)/bin/python ]; then $(MAKE) venv; fi
	VENV=$(VENV) PYTHON=$(PYTHON) WHEEL_OUT=$(WHEEL_OUT) WHEEL_ARCHS=$(WHEEL_ARCHS) bash scripts/build_wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
