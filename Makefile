# make demo | test | lint | bench | notebooks | lab -- each creates .venv and installs into it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: install demo test lint format bench notebooks lab clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch is pinned in constraints.txt: 2.13.0 has a local CPU wheel here
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/elbolab demo --out $(OUT)/demo

test: $(STAMP)
	ELBOLAB_FAST=1 $(BIN)/python -m pytest tests notebooks --nbmake

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	# pomegranate is compared with where it installs; the benchmark says so when it does not
	-$(BIN)/python -m pip install -q -c constraints.txt pomegranate
	$(BIN)/python bench/bench_em.py
	$(BIN)/python bench/bench_em_libraries.py
	$(BIN)/python bench/bench_scale.py
	$(BIN)/python bench/bench_vae.py
	$(BIN)/python bench/bench_m2_accuracy.py
	$(BIN)/python bench/bench_compare.py
	$(BIN)/python bench/bench_hmm.py
	$(BIN)/python bench/bench_vb.py

notebooks: $(STAMP)
	mkdir -p $(OUT)/notebooks
	$(BIN)/jupyter nbconvert --to html --execute --output-dir $(OUT)/notebooks notebooks/*.ipynb
	@echo "executed notebooks written to $(OUT)/notebooks"

lab: $(STAMP)
	# JupyterLab on notebooks/; their kernel, python3, is this environment's own
	JUPYTER_PREFER_ENV_PATH=1 $(BIN)/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf $(OUT) build dist *.egg-info .pytest_cache .ruff_cache
