# Two entry points for a fresh machine: `make demo` (whole pipeline on the embedded demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: install demo test report clean-demo

# torch is installed first and pinned: an unpinned torch pulls the CUDA wheels (several GB).
$(BIN)/.lslo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,slurm]"
	touch $@

install: $(BIN)/.lslo-installed

demo: install
	$(BIN)/snakemake --profile profiles/local --cores $(CORES)

report: demo
	$(BIN)/snakemake --profile profiles/local --cores 1 --report results/report.html

test: install
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf results logs .snakemake
