# Two entry points, each setting up .venv from the package registries first:
#   make train   installs flashkat and trains a small KAT on the bundled digits data set
#   make test    installs flashkat with its test extras and runs the test suite
# torch/torchvision are pinned to the releases this project's CI machines carry.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: setup setup-test train test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

setup: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e .

setup-test: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[test]"

train: setup
	$(VENV)/bin/flashkat train

test: setup-test
	$(VENV)/bin/python -m pytest -q
