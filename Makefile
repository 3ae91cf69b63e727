# Two entry points on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# one stamp per torch requirement: changing TORCH installs again
STAMP := $(BIN)/.installed-$(shell printf '%s' '$(TORCH)' | tr -c 'A-Za-z0-9.' '_')

.PHONY: demo test setup clean peer-wheels

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	rm -f $(BIN)/.installed*
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fusedopt.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Peer optimizers for benchmarks/gpu_campaign.sh peers: the wheels, for a GPU machine without network
# (the device tool carries .whl/ there). Not needed by the tests or the demo.
peer-wheels:
	$(PYTHON) -m pip download -q --no-deps -d .whl "bitsandbytes==0.50.2" "torchao==0.18.0"

clean:
	rm -rf $(VENV) build *.egg-info
