# Two commands set up a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/gateway.toml

.PHONY: run test lint typecheck pytest test-deps dev-setup bench clean sink

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Development keys and a self-signed certificate under var/, made once.
dev-setup: $(STAMP)
	$(BIN)/python -m gateway.devsetup --config $(CONFIG)

run: dev-setup
	$(BIN)/gateway serve --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench

typecheck: $(STAMP)
	$(BIN)/mypy gateway

# The real-upstream test drives Debian's Postfix; install it when missing (root, as in CI).
# "No configuration" keeps the system's own Postfix unconfigured: the test runs a private one.
test-deps:
	@test -x /usr/sbin/postfix || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    postfix libsasl2-modules >/dev/null; }
	@command -v systemd-analyze >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    systemd >/dev/null; }
	@command -v strace >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    strace >/dev/null; }

pytest: $(STAMP) test-deps
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/accept.py

clean:
	rm -rf $(VENV) var build *.egg-info

# A local receiving server with STARTTLS on 127.0.0.1:2526 for the README's first message.
sink: dev-setup
	$(BIN)/python -m gateway.devsink --cert var/tls/cert.pem --key var/tls/key.pem
