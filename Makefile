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
# The lock pins the same release (tools/lockfile.py reads this line).
TORCH_PIN ?= torch==2.13.0

# Every install comes from the committed lock (requirements-*.lock, made by `make lock`),
# so a fresh machine gets exactly what the tests passed with; the project itself goes in
# editable, without dependencies of its own choosing.
PIP_TOOLS := pip-tools==7.6.2

.PHONY: demo test test-slow test-all test-latest lint typecheck bench clean system-deps \
	lock lock-upgrade lock-check

$(PY):
	$(PYTHON) -m venv $(VENV)

lock-check:
	@$(PYTHON) tools/lockfile.py check

$(STAMP_CORE): requirements-core.lock pyproject.toml | $(PY)
	@$(PYTHON) tools/lockfile.py check
	$(PIP) install -r requirements-core.lock
	$(PIP) install --no-deps -e .
	touch $@

# torch first, from the pin: the lock's torch line then finds it installed (a CPU machine
# keeps its CPU build).
$(STAMP_TRAIN): requirements-train.lock pyproject.toml | $(PY)
	@$(PYTHON) tools/lockfile.py check
	$(PIP) install '$(TORCH_PIN)'
	$(PIP) install -r requirements-train.lock
	$(PIP) install --no-deps -e .
	touch $(STAMP_CORE) $@

$(STAMP_DEV): requirements-dev.lock pyproject.toml | $(PY)
	@$(PYTHON) tools/lockfile.py check
	$(PIP) install '$(TORCH_PIN)'
	$(PIP) install -r requirements-dev.lock
	$(PIP) install --no-deps -e .
	touch $(STAMP_CORE) $(STAMP_TRAIN) $@

# Resolve pyproject's ranges into the lock with pip-tools (in a venv of its own, so the
# tool's own dependencies never reach the lock), keeping the versions already locked.
# Commit requirements-*.lock afterwards.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip --disable-pip-version-check -q install '$(PIP_TOOLS)'
	.venv-lock/bin/python tools/lockfile.py compile

# The same, moving every package to the newest release pyproject allows.
lock-upgrade:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip --disable-pip-version-check -q install '$(PIP_TOOLS)'
	.venv-lock/bin/python tools/lockfile.py upgrade

# The newest releases pyproject allows (not the lock), in a venv of their own: how the
# next `make lock` would fare. Not part of CI. torch stays at the pin: CPU machines have no
# other CPU build.
test-latest: $(STAMP_SYS)
	$(PYTHON) -m venv .venv-latest
	echo '$(TORCH_PIN)' > .venv-latest/torch-pin.txt
	.venv-latest/bin/python -m pip --disable-pip-version-check -q install '$(TORCH_PIN)'
	.venv-latest/bin/python -m pip --disable-pip-version-check -q install --upgrade \
		--upgrade-strategy eager -c .venv-latest/torch-pin.txt -e '.[train,dev]'
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/ruff check dandelion_p2p tests benchmarks tools
	.venv-latest/bin/mypy dandelion_p2p
	.venv-latest/bin/python -m pytest

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

# Sample images and the exported model land in DEMO_OUTPUT (`make demo DEMO_OUTPUT=dir`).
DEMO_OUTPUT ?= demo-output

demo: $(STAMP_TRAIN)
	$(PY) -m dandelion_p2p.demo --output '$(DEMO_OUTPUT)'

test: lock-check $(STAMP_DEV) $(STAMP_SYS)
	$(VENV)/bin/ruff check dandelion_p2p tests benchmarks tools
	$(VENV)/bin/mypy dandelion_p2p
	$(PY) -m pytest

test-slow: $(STAMP_DEV) $(STAMP_SYS)
	$(PY) -m pytest -m slow

test-all: $(STAMP_DEV) $(STAMP_SYS)
	$(PY) -m pytest -m ''

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check dandelion_p2p tests benchmarks tools

typecheck: $(STAMP_DEV)
	$(VENV)/bin/mypy dandelion_p2p

bench: $(STAMP_DEV)
	$(PY) benchmarks/stream_throughput.py
	$(PY) benchmarks/dht_latency.py --peers 40

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .pytest_cache .ruff_cache .mypy_cache *.egg-info
