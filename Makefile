# The two quickstart commands: `make demo` (the whole pipeline on the built-in demo world)
# and `make test` (the test suite). Each creates .venv if missing (reusing an active
# virtualenv instead), installs torch only when none is importable, then the package.

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
RUN ?= runs/tiny

.PHONY: install demo test test-all bench clean

$(VENV)/.chatforge-installed: pyproject.toml
	@$(PY) -m pip --version >/dev/null 2>&1 || { \
	  if [ "$(VENV)" = ".venv" ]; then rm -rf .venv; fi; \
	  if python3 -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed in $$(python3 -c 'import sys; print(sys.prefix)')"; \
	    python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]"
	@touch $@

install: $(VENV)/.chatforge-installed

demo: install
	$(VENV)/bin/chatforge pipeline --config configs/tiny.yaml --out $(RUN)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --timeout=300

test-all: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --timeout=1800 -m "slow or not slow"

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs build *.egg-info
