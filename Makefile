# One-command set-up: every target below creates .venv from requirements-test.lock first
# (requirements.lock, the runtime lock, plus the test and lint tools).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offscreen VTK rendering for report figures (no display on CI machines).
export VTK_DEFAULT_OPENGL_WINDOW ?= vtkEGLRenderWindow

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

$(STAMP): requirements.lock requirements-test.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "SpineInpaint needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

demo: setup
	rm -rf demo_output
	$(PY) -m SpineInpaintLib demo --out demo_output

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

# experiments/ is linted once it exists (the wildcard drops a missing folder).
LINT_PATHS := SpineInpaintLib Testing SpineInpaint $(wildcard experiments)

lint: setup
	$(PY) -m ruff check $(LINT_PATHS)

bench: setup
	$(PY) -m SpineInpaintLib bench

clean:
	rm -rf $(VENV) demo_output .pytest_cache
