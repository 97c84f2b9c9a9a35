# The two commands (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates or updates the virtual environment in .venv first; a second run with an
# unchanged pyproject.toml installs nothing.
VENV   ?= .venv
PYTHON ?= python3
# torch is pinned to the CPU build that ships on the development machines; on a GPU
# machine run `make TORCH_SPEC="torch" ...` (or install torch yourself first, see README).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/padst demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
