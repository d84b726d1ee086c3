# `make test` and `make demo` work on a fresh machine: they create the locked environment themselves.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(PYTHON) -m uv
VENV := .venv
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: env data test demo clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --extra test --extra dali --compile-bytecode
	@touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist (real images, installs offline from the Debian mirror).
data:
	@bash scripts/get_fashion_mnist.sh "$(FASHION_MNIST)"

test: env data
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The whole grid in miniature on Fashion-MNIST (workflow/config/demo.yaml), runs as local subprocesses;
# then Snakemake's HTML report of its tables and figures.
demo: env data
	$(VENV)/bin/snakemake --profile workflow/profiles/local all
	$(VENV)/bin/snakemake --profile workflow/profiles/local --report results/report.html

clean:
	rm -rf $(VENV) .pytest_cache
