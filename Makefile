# All set-up for a fresh Debian 12 machine (run as root). Every target is idempotent.
#   make demo   - set up everything, then run the migration demo
#   make test   - set up everything, then lint, type-check and run the test suite
#   make test-long - the long tests `make test` leaves out (the 3-host cluster test, ~10 min)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps

# Debian packages the project needs at run and test time.
DEBS := qemu-system-x86 qemu-utils busybox-static cpio zstd gcc libc6-dev make iproute2 \
        etcd-server etcd-client python3-venv ca-certificates openssl

.PHONY: setup deps venv image test test-long lint typecheck unit demo bench clean

setup: deps venv image

deps:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then echo "error: installing Debian packages needs root (run as root or install: $$missing)" >&2; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# etcd is started by the tests themselves; the Debian service must not hold port 2379.
	@if systemctl is-enabled etcd >/dev/null 2>&1; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: deps $(STAMPS)/venv

image: venv
	$(BIN)/novacron image build --profile test
	$(BIN)/novacron image build --profile default

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -m "not qemu and not netns and not etcd" -q

test: setup lint typecheck
	$(BIN)/pytest -q -m "not long"

# Tests that take many minutes of the machine (20 guests in a 3-host cluster, drained by live migration).
test-long: setup
	$(BIN)/pytest -q -m long

demo: setup
	$(BIN)/novacron demo

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(STAMPS) build .mypy_cache .ruff_cache .pytest_cache
