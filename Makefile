# `make run` and `make test` work on a fresh Debian machine with Python 3.11 as root:
# they create the virtual environment, install what is missing and start/test everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_UPDATED := /tmp/.ingest-apt-updated

.PHONY: run test unit integration bench bench-http bench-instructions docs venv venv-dev nginx chromium js \
	wrk valgrind clean

# ---- environments -------------------------------------------------------------------
$(VENV)/.runtime: requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -e .
	touch $(VENV)/.runtime $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

# System packages come from Debian's archive, installed only when missing.
$(APT_UPDATED):
	apt-get update -qq
	touch $@

nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { \
	  $(MAKE) -s $(APT_UPDATED) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }

wrk:
	@command -v wrk >/dev/null || { \
	  $(MAKE) -s $(APT_UPDATED) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

valgrind:
	@command -v valgrind >/dev/null || { \
	  $(MAKE) -s $(APT_UPDATED) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }

chromium:
	@[ -x /usr/bin/chromium ] || { \
	  $(MAKE) -s $(APT_UPDATED) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The official npm SDKs and playwright-core, at the versions in tests/js/package-lock.json.
tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

js: tests/js/node_modules/.installed

# ---- commands -----------------------------------------------------------------------
# The preflight refuses to start (one line per problem, exit 1) when a port of the tree
# is taken or var/ is not writable, rather than leaving nginx or a worker crash-looping.
run: venv nginx
	export INGEST_WORKERS=$${INGEST_WORKERS:-$$(nproc)} INGEST_PORT=$${INGEST_PORT:-8080}; \
	  $(PY) deploy/launch.py preflight && mkdir -p var/log var/queue var/spool && \
	  exec $(VENV)/bin/supervisord -n -c supervisord.conf -u $$(id -u)

test: venv-dev nginx chromium js
	$(PY) -m pytest -q tests/unit tests/integration

unit: venv-dev
	$(PY) -m pytest -q tests/unit

integration: venv-dev nginx chromium js
	$(PY) -m pytest -q tests/integration

# Load test: hello-world baseline and a worker pinned to one core, ratio in the same run.
bench: venv-dev
	$(PY) -m bench.run_all --rounds 3 --together 3

# The HTTP worker against the bare hello-world with wrk (docs/benchmarks.md): single GETs
# and 50-event batches, latency in an open loop, RSS after a soak and at 1,000
# connections, and through nginx in front of two workers. About 13 minutes.
bench-http: venv-dev wrk nginx
	$(PY) -m bench.wrk_bench --shapes single,batch50 --rounds 3 --duration 10 \
	  --together 3 --open-loop --soak 3000000 --wide 1000 --nginx

# Instructions per request under callgrind: steady where wrk's rates are not.
bench-instructions: venv-dev valgrind
	$(PY) -m bench.instructions
	$(PY) -m bench.instructions --seam
	$(PY) -m bench.instructions --processes

# The generated reference pages (docs/reference/): settings, metrics, rejection reasons.
docs: venv
	$(PY) -m ingest.reference

clean:
	rm -rf $(VENV) tests/js/node_modules var bench/out
