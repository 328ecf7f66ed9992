# TotalGen — two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

.PHONY: demo test lint install clean-demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# The whole pipeline on the built-in phantom cohort (see README, "Demo").
demo: $(STAMP)
	$(PY) 0_Preprocess/0_make_phantom_cohort.py --out $(DEMO)/phantom --n 12 --seed 0 \
	    --spacing-mm 4 --previews $(DEMO)/results/phantom_previews
	$(PY) 0_Preprocess/0_make_phantom_cohort.py --out $(DEMO)/phantom --n 12 --seed 0 \
	    --spacing-mm 4 --distribution-figure $(DEMO)/results/phantom_distribution.png
	@echo "demo finished: results in $(DEMO)/results"

clean-demo:
	rm -rf $(DEMO)
