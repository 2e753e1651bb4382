# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch/torchvision pinned to the builds this project is developed against; pyproject keeps ranges.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,local,slurm]'
	touch $(STAMP)

# The embedded default: small batch vs large batch (baseline, +LR, +GBN, +RA) on scikit-learn's digits,
# then the Table-1 style summary and figures. One torch thread per job, jobs in parallel over the cores
# (joblib): the printed table is then the same on any number of cores and under any other load. The demo's
# runs live in their own folder (outputs/demo), so its report holds its 24 runs and nothing else.
demo: $(STAMP)
	$(BIN)/lbtrain -m sweep=demo hydra/launcher=local hydra.launcher.n_jobs=-1 threads=1 hydra.sweep.dir=outputs/demo
	$(BIN)/lbtrain-report outputs/demo/digits --out outputs/demo/report

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

clean:
	rm -rf outputs/* $(VENV)
