# The two set-up commands of the README:
#   make demo   set everything up (first time: ~6 min wheel build), then a looped generation
#               on the bundled SmolLM2 with the stock answer beside it
#   make test   set everything up, then the test suite
#   make dist   the loopcpp wheel in dist/ (installs without a checkout, see README)
#   make test-vulkan   the loop on llama.cpp's Vulkan backend against its CPU backend (Debian/Ubuntu:
#               installs the Vulkan packages as root and builds the patched Vulkan library, about
#               30 min on 2 busy cores the first time; the tests take 4-11 min per family on the
#               software device lavapipe, used when there is no GPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROMPT ?= Explain in one sentence why the sky is blue.

.PHONY: setup demo test test-vulkan lint wheel dev dist clean-venv

setup:
	@PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/loopcpp generate smollm2-135m-instruct --compare -p "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

test-vulkan: setup
	bash scripts/vulkan_deps.sh
	nice -n 10 $(PY) -m loopcpp.build dev --backend vulkan > /dev/null
	LOOPCPP_VULKAN=1 $(PY) -m pytest -q -s tests/test_vulkan.py

lint: setup
	$(VENV)/bin/ruff check loopcpp tests scripts models

wheel:
	$(PY) -m loopcpp.build wheel

dev:
	$(PY) -m loopcpp.build dev

# the loopcpp wheel (with the model manifest and the patch series as package data)
dist: setup
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

clean-venv:
	rm -rf $(VENV)
