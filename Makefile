# covidcxr — see README.md. Every target builds on `make install`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The shared folder (holds data/ and weights/): $COVIDCXR_SHARED, else ../shared beside the checkout.
# A path to its data/ folder is accepted too (the older meaning). `make demo DATA=...` picks another data set.
SHARED ?= $(shell s="$${COVIDCXR_SHARED:-../shared}"; \
            if [ ! -d "$$s/data" ] && { [ "$$(basename "$$s")" = data ] || [ -d "$$s/covid-cxr-dev" ]; }; \
            then dirname "$$s"; else echo "$$s"; fi)
DATA   ?= $(SHARED)/data/covid-cxr-dev
DEMO_OUT ?= demo-out
# pytest workers: 2 on this 2-core machine; override with `make test PYTEST_WORKERS=0`
PYTEST_WORKERS ?= 2

.PHONY: install test demo bench clean _pip_install

# The install stamp is named after a hash of what the install depends on (pyproject.toml and the pinned
# torch line below), not its file time: a fresh clone beside a current venv does not re-run pip, and
# any change to the dependencies does. `.installed` is kept as a plain marker for other tools.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
INSTALL_HASH := $(shell { cat pyproject.toml; echo '$(TORCH_PINS)'; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(INSTALL_HASH)

$(STAMP):
	@# a venv installed by the older, time-based stamp after the last pyproject.toml edit is adopted as is
	@if [ -x $(PY) ] && [ -f $(VENV)/.installed ] && [ $(VENV)/.installed -nt pyproject.toml ] \
	    && ! ls $(VENV)/.installed-* >/dev/null 2>&1; then touch $@; echo "venv is current ($@)"; exit 0; fi; \
	$(MAKE) --no-print-directory _pip_install && rm -f $(VENV)/.installed-* && touch $@ $(VENV)/.installed

_pip_install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the pinned wheels lie on this machine's disk
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[all]'

install: $(STAMP)

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --timeout 900 tests

demo: install
	COVIDCXR_SHARED="$(SHARED)" bash scripts/demo.sh "$(DATA)" "$(DEMO_OUT)"

# Speed figures for docs/benchmarks.md; each script prints a table and writes benchmarks/results/*.json.
bench: install
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/inference.py --threads 1
	$(PY) benchmarks/explain_speed.py
	$(PY) benchmarks/service_load.py
	$(PY) benchmarks/quantize_speed.py --threads 1
	$(PY) benchmarks/service_load.py --requests 48 --max-batches 1 8 --engines onnx-fp32 onnx-int8 --out benchmarks/results/service_batching.json
	$(PY) benchmarks/onnx_cost.py
	-$(PY) benchmarks/ray_scaling.py  # needs the ray extra
	-$(PY) benchmarks/dicom_node.py  # needs the Orthanc binary (Debian package orthanc); says so and exits 2 without it

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
