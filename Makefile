# lorakit: `make lab` to learn, `make test` to check. See README.md.
#
# Everything is installed into .venv by these rules; nothing is assumed to be on the machine
# except Python 3 (>= 3.10) with venv, and make. `make test` also finds or installs a Chromium.

PYTHON ?= python3
VENV   ?= .venv
# torch is installed before everything else, so the packages that need it find it there. The tests
# compare bit for bit, so the default is the release they were last run with (constraints.txt pins the rest).
TORCH  ?= torch==2.13.0
# On Linux without an NVIDIA GPU, torch comes from PyTorch's CPU index (the CPU build, instead of several
# GB of CUDA libraries) when that index answers within 5 s; otherwise from pip's own index and config.
# TORCH_CPU_INDEX= (empty) always uses pip's index; TORCH="torch --index-url ..." chooses outright.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Lab server: LAB_IP=0.0.0.0 to reach it from another machine (mind the token it prints).
LAB_IP   ?= 127.0.0.1
LAB_PORT ?= 8888
# Tests run in TEST_WORKERS processes (notebooks: NBVAL_WORKERS, one notebook each); each gets
# TEST_THREADS torch threads, so that two workers do not fight over two cores (oversubscribed, a step
# ran 3-30x slower).
TEST_WORKERS  ?= 2
NBVAL_WORKERS ?= 2
TEST_THREADS  ?= 1
# The browser tests' Chromium: empty finds one (see the chromium rule), or CHROMIUM=/path/to/chromium.
CHROMIUM ?=

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
# The torch choice: rewritten only when it changes, so that a new TORCH reinstalls (STAMP depends on it).
TORCH_CHOICE  := $(VENV)/.lorakit-torch
CHROMIUM_PATH := $(VENV)/.lorakit-chromium
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
PYTEST := OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest

.PHONY: help install assets lab test unit slow lint notebooks browser chromium book student env clean FORCE

help:
	@echo "make lab        set up everything and start JupyterLab on notebooks/"
	@echo "make test       set up everything, then lint and run every test: unit, slow, notebooks, browser"
	@echo "make unit       the fast unit tests (no SmolLM2, no book build): the quick loop"
	@echo "make slow       the slow tests (those that load SmolLM2, build the book, run pyproject2conda)"
	@echo "make lint       ruff check and ruff format --check"
	@echo "make book       build the Jupyter Book into book/_build/html"
	@echo "make student    the student edition (solutions cleared) into student/"
	@echo "make env        regenerate environment.yml from pyproject.toml"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(TORCH_CHOICE): FORCE | $(PY)
	@echo '$(TORCH) $(TORCH_CPU_INDEX)' | cmp -s - $@ 2>/dev/null || echo '$(TORCH) $(TORCH_CPU_INDEX)' > $@

# The pip options that pick torch's build (printed to stdout; the reason to stderr).
TORCH_INDEX_OPTIONS = case '$(TORCH)' in (*index-url*) exit 0;; esac; \
	[ -n '$(TORCH_CPU_INDEX)' ] && [ "$$(uname -s)" = Linux ] || exit 0; \
	{ [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1; } && exit 0; \
	if $(PY) -c "import urllib.request as u; u.urlopen(u.Request('$(TORCH_CPU_INDEX)/torch/', method='HEAD'), timeout=5)" 2>/dev/null; \
	then echo "No NVIDIA GPU: the CPU build of torch, from $(TORCH_CPU_INDEX)" >&2; echo "--index-url $(TORCH_CPU_INDEX)"; \
	else echo "No NVIDIA GPU, but $(TORCH_CPU_INDEX) does not answer: torch from pip's own index" >&2; fi

$(STAMP): pyproject.toml constraints.txt $(TORCH_CHOICE) | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) $$($(TORCH_INDEX_OPTIONS))
	@# llama-cpp-python (the gguf-run extra) is a source package: pip compiles llama.cpp's library only, for this CPU.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -c constraints.txt -e ".[reference,deploy,gguf-run,lab,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lorakit)" >/dev/null
	@# nbgrader is here for its ClearSolutions preprocessor (make student), not its course-management UI.
	$(VENV)/bin/jupyter labextension disable --level=sys_prefix @jupyter/nbgrader >/dev/null 2>&1
	for ext in assignment_list course_list formgrader validate_assignment; do \
		$(VENV)/bin/jupyter server extension disable --sys-prefix nbgrader.server_extensions.$$ext >/dev/null 2>&1; done
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

# Markers (pyproject.toml, tests/conftest.py): `model` loads SmolLM2, `slow` takes long (every `model`
# test, the book builds, the pyproject2conda runs).
unit: assets
	$(PYTEST) tests -q -n $(TEST_WORKERS) -m "not slow" --ignore=tests/browser

slow: assets
	$(PYTEST) tests -q -n $(TEST_WORKERS) -m slow --ignore=tests/browser

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

notebooks: assets
	$(PYTEST) notebooks -q -n $(NBVAL_WORKERS) --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=1200 \
		--nbval-sanitize-with tests/nbval_sanitize.cfg

# A Chromium for the browser tests, its path kept in $(CHROMIUM_PATH): CHROMIUM when set; else one
# already here (the system's, or Playwright's own); else Playwright's own, downloaded where its servers
# answer; else Debian's package (apt-get, as root or through sudo -n). Only where none of these works
# does it stop, with the one-line instruction.
chromium: $(STAMP)
	@playwright_chromium() { $(PY) -c "from playwright.sync_api import sync_playwright; p = sync_playwright().start(); print(p.chromium.executable_path); p.stop()" 2>/dev/null; }; \
	runs() { [ -n "$$1" ] && [ -x "$$1" ] && "$$1" --headless --no-sandbox --version >/dev/null 2>&1; }; \
	if [ -n '$(CHROMIUM)' ]; then \
		exe=$$(command -v '$(CHROMIUM)') && runs "$$exe" || { echo "CHROMIUM=$(CHROMIUM) is not a Chromium that runs here"; exit 1; }; \
	else \
		exe=$$(command -v chromium || command -v chromium-browser); \
		runs "$$exe" || exe=$$(playwright_chromium); \
		if ! runs "$$exe"; then \
			echo "Downloading Playwright's Chromium (playwright install chromium)"; \
			PLAYWRIGHT_DOWNLOAD_CONNECTION_TIMEOUT=15000 $(PY) -m playwright install chromium >$(VENV)/playwright-install.log 2>&1 \
				|| echo "  not reachable here (see $(VENV)/playwright-install.log)"; \
			exe=$$(playwright_chromium); \
		fi; \
		if ! runs "$$exe" && command -v apt-get >/dev/null 2>&1; then \
			if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
			if [ "$$sudo" != none ]; then \
				echo "Installing Debian's chromium (apt-get install chromium)"; \
				$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; \
				exe=$$(command -v chromium); \
			fi; \
		fi; \
		runs "$$exe" || { echo "The browser tests need Chromium: sudo apt-get install chromium, or $(PY) -m playwright install --with-deps chromium, or make test CHROMIUM=/path/to/chromium"; exit 1; }; \
	fi; \
	echo "Chromium for the browser tests: $$exe"; \
	echo "$$exe" > $(CHROMIUM_PATH)

browser: assets chromium
	LORAKIT_CHROMIUM=$$(cat $(CHROMIUM_PATH)) $(PY) -m pytest tests/browser -q -p no:xdist

test: lint unit slow notebooks browser

# The book is built from a generated copy of book/ (lorakit.bookgen, into the gitignored book/_src): there each
# "### Build it:" cell becomes a sphinx-exercise exercise and its solution a hidden one, and each `answer` cell
# a hidden answer, so that the notebooks themselves hold no MyST directives. The HTML lands in book/_build/html.
book: $(STAMP)
	$(PY) -m lorakit.bookgen book book/_src
	$(VENV)/bin/jupyter-book build book/_src --path-output book --warningiserror --keep-going

# The student edition: every notebook with its solutions cleared by nbgrader's ClearSolutions, its answers and
# outputs cleared (lorakit/student.py), into the gitignored student/. Hand out that folder.
student: $(STAMP)
	$(PY) -m lorakit.student --src notebooks --out student

env: $(STAMP)
	$(VENV)/bin/pyproject2conda project --overwrite force

clean:
	rm -rf book/_build book/_src student $(VENV)
