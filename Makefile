# The two entry points are `make demo` and `make test`; everything they need is
# installed by the targets below, so a fresh Debian 12 machine needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := mosquitto mosquitto-clients ffmpeg fonts-dejavu-core python3-venv \
	python3-dev sqlite3 curl chromium systemd openssl
PYTEST_ARGS ?=
export CLASSCAP_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: demo test lint unit bench chaos deps clean

demo: $(VENV)/.installed
	$(PY) -m controller.demo

test: lint
	$(PY) -m pytest -n 5 --dist loadgroup -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

# A simulated school day with every fault (docs/simulator.md); about 40 minutes.
chaos: $(VENV)/.installed
	$(VENV)/bin/classcap sim run school-day

.deps-apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
	touch $@

$(VENV)/.installed: pyproject.toml .deps-apt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .deps-apt .mypy_cache .ruff_cache .pytest_cache
