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

# The whole pipeline on the built-in phantom cohort (see README, "Demo"): about 4 minutes on 2 cores.
demo: $(STAMP)
	$(PY) 0_Preprocess/0_make_phantom_cohort.py --out $(DEMO)/phantom --n 32 --seed 0 --spacing-mm 8 --quiet \
	    --previews $(DEMO)/results/phantom_previews --distribution-figure $(DEMO)/results/phantom_distribution.png
	$(PY) 1_Trainings/train_lowres.py --config 1_Trainings/configs/lowres_demo.yaml --quiet
	printf 'subject_id,height_m,weight_kg,sex,age_years\nsyn_f_slim,1.60,52,F,35\nsyn_f_heavy,1.62,95,F,60\nsyn_m_slim,1.85,60,M,45\nsyn_m_heavy,1.78,99,M,70\n' > $(DEMO)/generate.csv
	$(PY) 1_Trainings/train_superres.py --config 1_Trainings/configs/superres_demo.yaml --quiet
	$(PY) 2_Tests/infer.py --lowres $(DEMO)/runs/lowres --superres $(DEMO)/runs/superres \
	    --demographics $(DEMO)/generate.csv --out $(DEMO)/generated --quiet
	@echo "demo finished: figures in $(DEMO)/results, generated volumes and previews in $(DEMO)/generated"

clean-demo:
	rm -rf $(DEMO)
