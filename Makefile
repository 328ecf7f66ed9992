# TotalGen — two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out

WEIGHTS_BUILD ?= bench_out/demo_weights

.PHONY: demo demo-weights demo-weights-labels demo-weights-sampler test lint install figures clean-demo

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

# The whole pipeline on the built-in phantom cohort (see README, "Demo"): under 10 minutes on 2 cores.
demo: $(STAMP)
	$(PY) 0_Preprocess/0_make_phantom_cohort.py --out $(DEMO)/phantom --n 32 --seed 0 --spacing-mm 8 --quiet \
	    --previews $(DEMO)/results/phantom_previews --distribution-figure $(DEMO)/results/phantom_distribution.png
	@echo "fine-tuning the demo weights of Resource/demo_weights/ (made by make demo-weights) on the demo cohort"
	$(PY) 1_Trainings/train_lowres.py --config 1_Trainings/configs/lowres_demo.yaml --quiet
	$(PY) 1_Trainings/train_superres.py --config 1_Trainings/configs/superres_demo.yaml --quiet
	$(PY) 1_Trainings/train_labels.py --config 1_Trainings/configs/labels_demo.yaml --quiet
	$(PY) 0_Preprocess/0_make_phantom_cohort.py --out $(DEMO)/heldout --n 8 --seed 1 --prefix heldout \
	    --spacing-mm 8 --quiet
	$(PY) 2_Tests/infer.py --lowres $(DEMO)/runs/lowres --superres $(DEMO)/runs/superres --labels $(DEMO)/runs/labels \
	    --demographics $(DEMO)/heldout/demographics.csv --out $(DEMO)/generated --quiet
	$(PY) 3_Evaluations/3_compare_cohorts.py --reference $(DEMO)/heldout --synthetic $(DEMO)/generated \
	    --synthetic $(DEMO)/phantom --out $(DEMO)/results/comparison --quiet
	@echo "demo finished: generated cohort in $(DEMO)/generated (weights: Resource/demo_weights/ fine-tuned" \
	    "in $(DEMO)/runs), figures and tables in $(DEMO)/results"
	@echo "(make figures copies the README's figures into Resource/)"

# The demo's starting weights: the closed-loop fidelity benchmark trains both stages and the label stage from
# scratch on 240 phantoms (bench presets, seed 0; about 105 minutes on 2 cores), then the EMA weights are exported.
demo-weights: $(STAMP)
	$(PY) bench/fidelity.py --out $(WEIGHTS_BUILD) --quiet
	mkdir -p Resource/demo_weights
	$(PY) 1_Trainings/export_safetensors.py --checkpoint $(WEIGHTS_BUILD)/runs/lowres \
	    --out Resource/demo_weights/lowres.safetensors --made-by "make demo-weights"
	$(PY) 1_Trainings/export_safetensors.py --checkpoint $(WEIGHTS_BUILD)/runs/superres \
	    --out Resource/demo_weights/superres.safetensors --made-by "make demo-weights"
	$(PY) 1_Trainings/export_safetensors.py --checkpoint $(WEIGHTS_BUILD)/runs/labels \
	    --out Resource/demo_weights/labels.safetensors --made-by "make demo-weights"
	cp $(WEIGHTS_BUILD)/fidelity.md Resource/demo_weights/fidelity.md
	cp $(WEIGHTS_BUILD)/fidelity.png Resource/fidelity.png
	cp $(WEIGHTS_BUILD)/previews.png Resource/fidelity_previews.png

# The label stage alone, as make demo-weights trains it (labels_bench.yaml on the same 240 training phantoms, seed 0;
# about 25 minutes on 2 cores), for image weights that were made before the label stage existed.
demo-weights-labels: $(STAMP)
	$(PY) 0_Preprocess/0_make_phantom_cohort.py --out $(WEIGHTS_BUILD)/train --n 240 --seed 0 --prefix train \
	    --spacing-mm 8 --workers 2 --quiet
	$(PY) 1_Trainings/train_labels.py --config 1_Trainings/configs/labels_bench.yaml --cohort $(WEIGHTS_BUILD)/train \
	    --run-dir $(WEIGHTS_BUILD)/runs/labels --quiet
	mkdir -p Resource/demo_weights
	$(PY) 1_Trainings/export_safetensors.py --checkpoint $(WEIGHTS_BUILD)/runs/labels \
	    --out Resource/demo_weights/labels.safetensors --made-by "make demo-weights-labels"

# After a bench preset's sample: section changed (a sampler measured on the committed weights): record it in
# Resource/demo_weights/*.safetensors without retraining (tensors unchanged; a file already on it is left alone).
demo-weights-sampler: $(STAMP)
	for stage in lowres superres; do \
	    $(PY) 1_Trainings/export_safetensors.py --checkpoint Resource/demo_weights/$$stage.safetensors \
	        --sample-from 1_Trainings/configs/$${stage}_bench.yaml --out Resource/demo_weights/$$stage.safetensors \
	        --made-by "make demo-weights-sampler" || exit 1; \
	done

# Regenerate the README's figures in Resource/: the pipeline diagram, and the demo's demographic
# distributions and violin comparisons (runs the demo first if its results are missing).
figures: $(STAMP)
	$(PY) Resource/make_pipeline_figure.py Resource/pipeline.png
	test -f $(DEMO)/results/comparison/figures/violins_body.png || $(MAKE) demo
	cp $(DEMO)/results/comparison/figures/demographics.png Resource/demo_demographics.png
	cp $(DEMO)/results/comparison/figures/violins_organs.png Resource/demo_violins_organs.png
	cp $(DEMO)/results/comparison/figures/violins_body.png Resource/demo_violins_body.png
	cp $(DEMO)/results/comparison/figures/previews.png Resource/demo_previews.png

clean-demo:
	rm -rf $(DEMO)
