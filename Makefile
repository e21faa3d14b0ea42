# The two commands: `make demo` and `make test`. Everything they need, they install.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench fuzz sysdeps clean

$(STAMP): pyproject.toml setup.py common/esp/_esp_fast.c member/_batch_io.c
	@command -v $(PY) >/dev/null 2>&1 || { echo "make: $(PY) not found (set PY=...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

# Debian packages: libssl-dev for the compiled ESP path (common/esp/_esp_fast.c), and the
# real-peer tests (strongSwan, ping, tcpdump); only as root.  `test` runs it before
# the install so the extension gets built.
sysdeps:
	@./scripts/install-sysdeps.sh

demo: $(STAMP)
	$(BIN)/python -m bench.demo

lint: $(STAMP)
	$(BIN)/ruff check common dispatcher member tests bench

typecheck: $(STAMP)
	$(BIN)/mypy common dispatcher member

unit: $(STAMP)
	$(BIN)/pytest -q

test: sysdeps $(STAMP) lint typecheck unit

# The hostile-input targets (tests marked `fuzz`) with 100x the examples of `make test`.
fuzz: $(STAMP)
	IPSEC_CLUSTER_FUZZ=1 $(BIN)/pytest -q -m fuzz tests

bench: $(STAMP)
	$(BIN)/pytest bench -q --benchmark-columns=min,median,mean,ops --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info
