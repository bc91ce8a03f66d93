# `make run` serves (SQLite, demo models); `make test` passes. Both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= var/pacs-ai.toml
PYTEST_ARGS ?=

.PHONY: run test test-all bench lint system-deps clean

$(BIN)/pacs-ai: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	mkdir -p var/models && touch $@

# The first console user: admin, with a random password kept (mode 600) beside the config.
CONSOLE_PASSWORD := $(dir $(CONFIG))console-password

$(CONFIG): | $(BIN)/pacs-ai
	mkdir -p $(dir $(CONFIG))
	cp deploy/local.toml $(CONFIG)
	umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(12))' > $(CONSOLE_PASSWORD)
	$(BIN)/pacs-ai http user admin --role operator < $(CONSOLE_PASSWORD) >> $(CONFIG)
	@echo "wrote $(CONFIG) with a console user admin (edit it, then run make run again)"

var/models/.demo: | $(BIN)/pacs-ai
	@if [ -z "$$(find var/models -name 'manifest.*' 2>/dev/null | head -1)" ]; then \
	  echo "no models under var/models: training the demo models (a few minutes, once)"; \
	  $(BIN)/pacs-ai models demo --out var/demo && mkdir -p var/models && \
	  cp -r var/demo/models/. var/models/; \
	fi
	mkdir -p var/models && touch $@

run: $(BIN)/pacs-ai $(CONFIG) var/models/.demo
	$(BIN)/pacs-ai db upgrade --config $(CONFIG)
	@$(BIN)/pacs-ai http console --config $(CONFIG) --password-file $(CONSOLE_PASSWORD)
	$(BIN)/pacs-ai serve --config $(CONFIG)

system-deps:
	@bash tests/system-deps.sh

lint: $(BIN)/pacs-ai
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(BIN)/pacs-ai system-deps lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-all: $(BIN)/pacs-ai system-deps lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(BIN)/pacs-ai system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info
