# The two commands of the README: `make demo` and `make test` (each sets itself up).
PYTHON ?= python3
VENV ?= .venv
# Pinned here because an unpinned torch would pull a multi-GB CUDA build on CPU machines;
# on a GPU cluster run e.g. `make setup TORCH_SPEC=torch` to keep your CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,sweep,mpi,deepspeed,hf
BIN := $(VENV)/bin
DEMO_DIR ?= outputs/demo
# Two test files at a time (pytest-xdist, one file per worker so module fixtures and the Slurm
# cluster are set up once): most tests wait on processes, ports and daemons rather than compute,
# so two workers on two cores finish the suite in ~2/3 of the serial time. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@# trainer.compile=true on CPU (and its tests) builds C++ kernels: a compiler and Python's headers
	@command -v "$${CXX:-g++}" >/dev/null 2>&1 || echo "setup: no C++ compiler ($${CXX:-g++}): trainer.compile=true and \
	its tests need one (Debian/Ubuntu: apt-get install g++ python3-dev)" >&2
	touch $@

demo: setup
	$(BIN)/disttrain dist.nproc_per_node=2 trainer.max_steps=200 trainer.log_every=20 \
		checkpoint.every_steps=100 hydra.run.dir=$(DEMO_DIR) checkpoint.resume=auto

test: setup
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
