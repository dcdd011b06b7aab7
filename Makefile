# lmforge: `make quickstart` installs and runs the quickstart; `make test` installs the test
# dependencies and runs the whole suite. Both work on a machine that only has Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; for a CUDA build: make quickstart TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install install-test browser quickstart test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, and only when it is missing, so that pip never pulls a CUDA build by itself
install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -q -e .

install-test: install browser
	$(BIN)/python -m pip install -q -e '.[test]'

# Chromium for the web page's browser test (tests/e2e/test_web_page.py, driven by the playwright package
# from the test extra). Installed with apt-get when we can (Debian, as root); else that test is skipped.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium (apt-get) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: /usr/bin/chromium is missing and cannot be installed here (needs apt-get as root):"; \
		echo "      the browser test (tests/e2e/test_web_page.py) will be skipped"; \
	fi

quickstart: install
	$(BIN)/lmforge quickstart
	@echo "(the lmforge command is in $(VENV)/bin: activate it with  . $(VENV)/bin/activate)"

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache
