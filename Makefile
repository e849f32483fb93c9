# Two entry points for a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[cpu,test,serve,local,media,interop,deploy]'
	touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's chromium (Playwright without its own browser download); apt runs only when it is missing
$(CHROMIUM):
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

browser: $(CHROMIUM)

demo: $(STAMP)
	$(BIN)/vpr demo

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest

.PHONY: install browser demo test
