# The two quick-start commands (README): `make demo` and `make test`.
# Each creates .venv on first use, installs vfiomig (building its C core) and runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo test lint typecheck bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vfiomig demo

test: $(STAMP)
	VFIOMIG_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q
	VFIOMIG_PUREPYTHON=1 $(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check vfiomig tests benchmarks examples fuzz setup.py
	$(BIN)/ruff format --check vfiomig tests benchmarks examples fuzz setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.compare
	$(BIN)/vfiomig bench --scenario qemu --out bench-results
