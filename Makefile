# Two commands do everything on a fresh machine with Python 3.11:
#   make run    create .venv, install, run CollaFuse on the embedded digits (about 5 min on 2 cores)
#   make test   create .venv, install, run the test suite
# A dataset overlay with this machine's data directory:
#   make run OVERLAY=simulations/cifar10-cpu.toml RUN_CONFIG="data-dir='/data/cifar10'"
PYTHON ?= python3.11
VENV ?= .venv
RUN_CONFIG ?=
OVERLAY ?=
OUTPUT_DIR ?= $(CURDIR)/results/runs
export HF_HUB_OFFLINE = 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: install federation run test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

# Give the local simulation federation 5 SuperNodes of 1 CPU each, as `make run` has, so that a
# plain `flwr run .` runs 5 clients (num-clients 0 takes the federation's size; Flower's default
# is 2). Stored by the local SuperLink in $$FLWR_HOME; this starts that SuperLink if none runs and
# leaves it running for the `flwr run .` to come. Its simulated clients trust the evaluator their
# runs' server trains (one user is every party); without that they decline to evaluate.
federation: install
	COLLAFUSE_TRUST_RUN_EVALUATOR=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/flwr federation simulation-config \
	    --num-supernodes 5 --client-resources-num-cpus 1

# collafuse-run stops the local SuperLink its run started (one running before is left alone)
run: install
	$(VENV)/bin/collafuse-run . $(if $(OVERLAY),--run-config $(OVERLAY)) \
	    --run-config "output-dir='$(OUTPUT_DIR)' $(RUN_CONFIG)"

# Two pytest workers, every torch process on one thread (tests/conftest.py): a real run's
# start-up and waits leave a core to the other worker's run. Tests that read one run or one
# deployment share a worker (xdist_group); one file alone: .venv/bin/python -m pytest tests/<file>
test: install
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup tests
