# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: demo studies test venv dev benchmark evaluate clean plan

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: on Linux x86-64 this CUDA build runs on CPU too (pin loosely; see README)
	$(PY) -m pip install -q "torch>=2.2" "torchvision>=0.17"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	@cp -u dagster.yaml $(DAGSTER_HOME)/dagster.yaml  # the shipped instance settings when newer
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-0} $(PY) -m musc_pipeline.demo

plan: $(STAMP)  # what a run would do: backbones, weights, device, categories, time and disk estimates
	$(PY) -m musc_pipeline.plan

studies: $(STAMP)  # after `make demo`: every ablation study of every category, then reports/study_*.html
	@mkdir -p $(DAGSTER_HOME)
	@cp -u dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m musc_pipeline.run_studies

test: $(STAMP)
	$(PY) -m pytest

dev: $(STAMP)
	@mkdir -p $(DAGSTER_HOME)
	@cp -u dagster.yaml $(DAGSTER_HOME)/dagster.yaml  # the shipped instance settings when newer
	$(VENV)/bin/dagster dev -w workspace.yaml

benchmark: $(STAMP)
	$(PY) benchmarks/msm.py

# every method variant on every PIPED type, both demo backbones (tables in .musc/evaluate/)
PIPED ?= ../shared/data/piped
evaluate: $(STAMP)
	nice -n 10 $(PY) benchmarks/evaluate.py --root $(PIPED)

clean:
	rm -rf .musc reports .dagster_home
