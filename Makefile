# One command to install, one to test, one to see it work. Everything lives in .venv.
PY := .venv/bin/python

.PHONY: install test test-gpu demo lint clean

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh scripts/build_mmcv.sh
	bash scripts/install.sh

test: .venv/.installed
	$(PY) -m pytest -q -n 2 tests

# The test files with GPU cases, on a CUDA machine's own Python (no install step; files of the
# OpenMMLab layer skip where mmengine is absent). On a CPU those cases skip.
GPU_PY ?= python3
GPU_TESTS := $(shell grep -lE "cuda|DEVICES" tests/test_*.py)

test-gpu:
	$(GPU_PY) -m pytest -q -p no:cacheprovider $(GPU_TESTS)

demo: .venv/.installed
	$(PY) tools/demo.py

lint: .venv/.installed
	$(PY) -m ruff check mm_spectral tools tests

clean:
	rm -rf .venv work_dirs demo_work_dir
