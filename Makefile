# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; re-running skips finished steps.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP_CORE := $(VENV)/.stamp-core
STAMP_TRAIN := $(VENV)/.stamp-train
STAMP_DEV  := $(VENV)/.stamp-dev
STAMP_SYS  := $(VENV)/.stamp-sys

# CPU machines take the local CPU wheel of torch; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-slow test-all lint typecheck bench clean system-deps

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP_CORE): pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

# The demo and the tests train tiny diffusers models on the CPU: torch is pinned first so that
# the train extra's range is already met and pip pulls no CUDA build.
$(STAMP_TRAIN): pyproject.toml $(STAMP_CORE)
	$(PIP) install '$(TORCH_PIN)'
	$(PIP) install -e '.[train]'
	touch $@

$(STAMP_DEV): pyproject.toml $(STAMP_TRAIN)
	$(PIP) install -e '.[train,dev]'
	touch $@

# Network-lab tests need ip(8), tc(8) and nft(8); the port-mapping tests also run Debian's
# miniupnpd as a real gateway when it is there; the web UI tests drive Debian's chromium.
# Installed only as root and when missing.
$(STAMP_SYS): | $(PY)
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null && { ! command -v nft >/dev/null || ! command -v ip >/dev/null || ! command -v tc >/dev/null || [ ! -x /usr/sbin/miniupnpd ] || [ ! -x /usr/bin/chromium ]; }; then \
		echo "installing nftables, iproute2, miniupnpd-nftables and chromium for the tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >/dev/null || true; \
		apt-get install -y -qq nftables iproute2 >/dev/null || \
			echo "warning: could not install nftables/iproute2; netlab tests will skip"; \
		apt-get install -y -qq miniupnpd-nftables >/dev/null 2>&1 || \
			echo "warning: could not install miniupnpd-nftables; its tests will skip"; \
		apt-get install -y -qq chromium >/dev/null 2>&1 || \
			echo "warning: could not install chromium; browser tests will skip"; \
	fi
	touch $@

system-deps: $(STAMP_SYS)

demo: $(STAMP_TRAIN)
	$(PY) -m dandelion_p2p.demo

test: $(STAMP_DEV) $(STAMP_SYS)
	$(VENV)/bin/ruff check dandelion_p2p tests benchmarks
	$(VENV)/bin/mypy dandelion_p2p
	$(PY) -m pytest

test-slow: $(STAMP_DEV) $(STAMP_SYS)
	$(PY) -m pytest -m slow

test-all: $(STAMP_DEV) $(STAMP_SYS)
	$(PY) -m pytest -m ''

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check dandelion_p2p tests benchmarks

typecheck: $(STAMP_DEV)
	$(VENV)/bin/mypy dandelion_p2p

bench: $(STAMP_DEV)
	$(PY) benchmarks/stream_throughput.py
	$(PY) benchmarks/dht_latency.py --peers 40

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
