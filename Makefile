# Two commands do everything on a fresh clone (see README.md):
#   make demo   the main job on the embedded synthetic sample
#   make test   the whole test suite (the browser test too when Chromium is installed)
#   make lab    JupyterLab on notebooks/, on 127.0.0.1, with the "labseg" kernel; prints the URL
# Each creates (or reuses) .venv, installs labseg with its dependencies into it and registers the
# Jupyter kernel "labseg" (display name "Python (labseg)") inside .venv, the one the notebooks select.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lab install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m ipykernel install --sys-prefix --name labseg --display-name 'Python (labseg)'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/labseg demo

test: $(STAMP)
	$(BIN)/python -m pytest

lab: $(STAMP)
	$(BIN)/python -m labseg.lab

clean:
	rm -rf data/cache outputs/runs outputs/report outputs/notebooks outputs/nbval
