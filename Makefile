.PHONY: install test bench quickstart

# the project's virtual environment once `make install` made it, else whatever python is first on PATH
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BASE_PYTHON ?= $(shell command -v python3.11 || command -v python3)

install:
	$(BASE_PYTHON) -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	.venv/bin/pip install -q -e '.[dev]'

test:
	$(PYTHON) -m pytest -q -ra

bench:
	$(PYTHON) bench/bench_models.py

quickstart:
	./quickstart.sh
