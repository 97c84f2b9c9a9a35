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

.PHONY: demo test clean deepsparse-env

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/padst demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -n 2 $(PYTEST_ARGS)

# Optional: DeepSparse for `padst bench peers`, in its own environment (it pins numpy 1.26
# and onnx 1.14, and ships wheels for Python 3.11 only).
DEEPSPARSE_PYTHON ?= python3.11
deepsparse-env: .venv-deepsparse/.installed
.venv-deepsparse/.installed:
	$(DEEPSPARSE_PYTHON) -m venv .venv-deepsparse
	.venv-deepsparse/bin/pip install --quiet deepsparse==1.8.0 "numpy==1.26.*" "onnx==1.14.*"
	touch $@

clean:
	rm -rf $(VENV) .venv-deepsparse build *.egg-info
