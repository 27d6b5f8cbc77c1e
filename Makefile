# Two commands do all set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: demo demo-image test lint install clean

$(VENV)/.installed: pyproject.toml deploy/install.sh
	PYTHON=$(PYTHON) deploy/install.sh --cpu --test --editable --venv $(VENV)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) jobs/clusterfit_video.py --demo

demo-image: $(VENV)/.installed
	$(PY) jobs/clusterfit_image.py --demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=12 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs data/demo_images data/demo_videos
