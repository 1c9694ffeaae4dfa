# make test   - create .venv, install, run the CPU test suite (Triton kernels under the interpreter)
# make bench  - create .venv, install, run the benchmarks on this machine's device
# make mutate - create .venv, install, run the listed mutants (scripts/mutants.py) against their tests; MUTATE_ARGS="--only A3 --jobs 2"
# make kernel-report - CPU only: compile every shipped kernel configuration for sm_90a and sm_80; registers, spills,
#                      smem, tensor-core op, main-loop SASS size into $KERNEL_REPORT_OUT/kernel-report.json
# make gpu-check - on a CUDA machine (preinstalled torch/triton, offline), within 7 minutes: tests/gpu, the benchmarks
#                  and the kernel report into $GPU_CHECK_OUT, with summary.md (scripts/gpu_check.py)
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
BENCH_OUT ?= .benchmarks/latest
KERNEL_REPORT_OUT ?= .benchmarks/kernel-report
export GPU_CHECK_OUT ?= gpu-check-out

.PHONY: test bench mutate kernel-report gpu-check venv clean

venv: $(VENV)/.camtl-installed

$(VENV)/.camtl-installed: setup.py pyproject.toml scripts/bootstrap.sh $(wildcard csrc/*)
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/bootstrap.sh
	touch $@

test: venv
	TRITON_INTERPRET=1 $(VPY) -m pytest tests

bench: venv
	$(VPY) benchmarks/run.py --out $(BENCH_OUT)

mutate: venv
	$(VPY) scripts/mutate.py $(MUTATE_ARGS)

kernel-report: venv
	$(VPY) scripts/kernel_report.py --out $(KERNEL_REPORT_OUT) $(KERNEL_REPORT_ARGS)

gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
