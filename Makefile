# Two commands do everything on a fresh clone (see README.md):
#   make demo   the main job on the embedded synthetic sample
#   make test   the whole test suite
# Both create (or reuse) .venv and install labseg with its dependencies into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/labseg demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf data/cache outputs/runs outputs/report outputs/notebooks outputs/nbval
