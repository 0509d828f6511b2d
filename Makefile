# fieldline: every target makes and fills .venv itself, so a fresh machine needs only `make`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test test-all lint lint-imports format bench proto venv mosquitto chromium clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel that lies on this machine's disk.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The tests and the demo run a real Mosquitto; install it when missing and we are root.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is not installed and this is not root: run 'sudo apt-get install mosquitto'" >&2; \
		echo "(make demo falls back to an embedded broker; the MQTT tests need mosquitto)" >&2; \
	fi

# The dashboard test drives Debian's chromium through chromedriver (never a downloaded browser).
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium/chromedriver are not installed and this is not root: run 'sudo apt-get install chromium chromium-driver'" >&2; \
		echo "(the dashboard test needs them)" >&2; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared cloud
	$(MAKE) --no-print-directory lint-imports

# The import rule (docs/architecture.md, Layout), as import-linter contracts in pyproject.toml.
# The source folders map into the fieldline package only when installed, so import-linter reads
# them through a folder of links that lays them out as fieldline/*.
IMPORTGRAPH := .importgraph
lint-imports: $(STAMP)
	@rm -rf $(IMPORTGRAPH) && mkdir -p $(IMPORTGRAPH)/fieldline && touch $(IMPORTGRAPH)/fieldline/__init__.py
	@for d in cloud edge shared kernels cli; do ln -s ../../$$d $(IMPORTGRAPH)/fieldline/$$d; done
	cd $(IMPORTGRAPH) && PYTHONPATH=. $(abspath $(BIN))/lint-imports --no-cache ../pyproject.toml

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint mosquitto chromium
	$(BIN)/python -m pytest -m "not slow" -q

test-all: lint mosquitto chromium
	$(BIN)/python -m pytest -q

demo: $(STAMP) mosquitto
	$(BIN)/fieldline demo $(ARGS)

bench: $(STAMP)
	@for b in bench/[!_]*.py; do echo "# $$b" >&2; $(BIN)/python $$b || exit 1; done

proto: $(STAMP)
	$(BIN)/python -m fieldline.shared.proto.codegen

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(IMPORTGRAPH)
