# signature-relay — the two commands a newcomer needs:
#   make serve   dev certificates + relay on 127.0.0.1:2525 + local tenant-inbound sink on :2526
#   make test    lint, type-check and the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests drive for real (binary → package).
SYSTEM_TOOLS := swaks:swaks openssl:openssl chromium:chromium kubectl:kubernetes-client \
	podman:podman runc:runc debootstrap:debootstrap

.PHONY: serve test lint typecheck unit system-deps bench bench-deps bench-e2e clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	@touch $@ $(VENV)/.installed-serve

serve: $(VENV)/.installed-serve
	$(BIN)/signature-relay certs init --missing-only
	$(BIN)/signature-relay serve

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test tools from Debian:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check relay tests benchmarks
	$(BIN)/hadolint Dockerfile

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy relay
	$(BIN)/mypy tests
	$(BIN)/mypy benchmarks

test: $(VENV)/.installed-test system-deps lint typecheck
	$(BIN)/pytest -q
	@echo "protocol tier again, every in-process server and client on uvloop (serve's default loop):"
	SR_TEST_EVENT_LOOP=uvloop $(BIN)/pytest -q -p no:cacheprovider tests/protocol

unit: $(VENV)/.installed-test
	$(BIN)/pytest -q tests/unit

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run.py

# The end-to-end benchmark's baselines (issue #14): Postfix (smtp-source, smtp-sink) and alterMIME.
bench-deps:
	@command -v altermime >/dev/null 2>&1 && [ -x /usr/sbin/smtp-source ] || { \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postfix altermime >/dev/null; }

bench-e2e: $(VENV)/.installed-test bench-deps
	$(BIN)/python benchmarks/e2e.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
