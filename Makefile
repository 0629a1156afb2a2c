# One-command set-up: every target below creates .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offscreen VTK rendering for report figures (no display on CI machines).
export VTK_DEFAULT_OPENGL_WINDOW ?= vtkEGLRenderWindow

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "SpineInpaint needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

demo: setup
	rm -rf demo_output
	$(PY) -m SpineInpaintLib demo --out demo_output

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

bench: setup
	$(PY) -m SpineInpaintLib bench

clean:
	rm -rf $(VENV) demo_output .pytest_cache
