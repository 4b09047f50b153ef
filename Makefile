# lorakit: `make lab` to learn, `make test` to check. See README.md.
#
# Everything is installed into .venv by these rules; nothing is assumed to be on the machine
# except Python 3 (>= 3.10) with venv, and make.

PYTHON ?= python3
VENV   ?= .venv
# Installed before everything else, so the packages that need torch find it there.
# CPU-only machines: TORCH="torch --index-url https://download.pytorch.org/whl/cpu" (see README).
TORCH  ?= torch
# Lab server: LAB_IP=0.0.0.0 to reach it from another machine (mind the token it prints).
LAB_IP   ?= 127.0.0.1
LAB_PORT ?= 8888
# Notebook tests run one notebook per worker; each test process gets TEST_THREADS torch threads,
# so that two workers do not fight over two cores (oversubscribed, a step ran 3-30x slower).
NBVAL_WORKERS ?= 2
TEST_THREADS  ?= 1
CHROMIUM ?= chromium

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: help install assets lab test unit notebooks browser book env clean

help:
	@echo "make lab    set up everything and start JupyterLab on notebooks/"
	@echo "make test   set up everything and run the unit tests and every notebook"
	@echo "make book   build the Jupyter Book into book/_build/html"
	@echo "make env    regenerate environment.yml from pyproject.toml"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lorakit)" >/dev/null
	@# JupyterLab offline: no news feed or update check (they call out to the internet).
	mkdir -p $(VENV)/share/jupyter/lab/settings
	echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' \
		> $(VENV)/share/jupyter/lab/settings/overrides.json
	touch $@

install: $(STAMP)

assets: $(STAMP)
	$(PY) -m lorakit.assets fetch

lab: assets
	@echo "Starting JupyterLab; open the http://$(LAB_IP):$(LAB_PORT)/lab?token=... URL printed below."
	$(VENV)/bin/jupyter-lab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) \
		--ServerApp.root_dir=notebooks $(ROOT_FLAG)

unit: assets
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest tests -q -n $(NBVAL_WORKERS) --ignore=tests/browser

notebooks: assets
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest notebooks -q -n $(NBVAL_WORKERS) --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=1200 \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

# Browser tests: JupyterLab in Debian's Chromium (apt-get install chromium; .ci/run does it).
browser: assets
	@command -v $(CHROMIUM) >/dev/null || { echo "Chromium is needed for the browser tests: sudo apt-get install chromium (or CHROMIUM=/path/to/chromium)"; exit 1; }
	LORAKIT_CHROMIUM=$$(command -v $(CHROMIUM)) $(PY) -m pytest tests/browser -q -p no:xdist

test: unit notebooks browser

book: $(STAMP)
	$(VENV)/bin/jupyter-book build book --warningiserror --keep-going

env: $(STAMP)
	$(VENV)/bin/pyproject2conda project --overwrite force

clean:
	rm -rf book/_build $(VENV)
