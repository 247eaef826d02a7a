# covidcxr — see README.md. Every target builds on `make install`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared/data
DATA   ?= $(SHARED)/covid-cxr-dev
DEMO_OUT ?= demo-out
# pytest workers: 2 on this 2-core machine; override with `make test PYTEST_WORKERS=0`
PYTEST_WORKERS ?= 2

.PHONY: install test demo bench clean

# The stamp is rebuilt whenever pyproject.toml changes, so `make test` keeps the venv up to date.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the pinned wheels lie on this machine's disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[all]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --timeout 900 tests

demo: install
	bash scripts/demo.sh "$(DATA)" "$(DEMO_OUT)"

# Speed figures for docs/benchmarks.md; each script prints a table and writes benchmarks/results/*.json.
bench: install
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/inference.py --threads 1
	$(PY) benchmarks/explain_speed.py
	$(PY) benchmarks/service_load.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
