.PHONY: install test bench quickstart

install:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	.venv/bin/pip install -q -e '.[dev]'

test:
	python -m pytest -q -ra

bench:
	python bench/bench_models.py
