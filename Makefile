# One command to install, one to test, one to see it work. Everything lives in .venv.
PY := .venv/bin/python

.PHONY: install test demo lint clean

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh scripts/build_mmcv.sh
	bash scripts/install.sh

test: .venv/.installed
	$(PY) -m pytest -q -n 2 tests

demo: .venv/.installed
	$(PY) tools/demo.py

lint: .venv/.installed
	$(PY) -m ruff check mm_spectral tools tests

clean:
	rm -rf .venv work_dirs demo_work_dir
