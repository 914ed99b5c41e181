# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RESUNET := $(VENV)/bin/resunet
DATA ?= ../shared/camvid

.PHONY: install install-dev demo test benchmark camvid camvid-seed camvid-gpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Generated VOC-format data → train (CPU, bf16 where the CPU has it) → evaluate → predict → picture grid.
DEMO_DATA := data/demo
DEMO_RUN := runs/demo
demo: install
	$(RESUNET) demo-data $(DEMO_DATA) --train 96 --val 24 --size 128 --seed 0
	$(RESUNET) train --data-root $(DEMO_DATA) --out $(DEMO_RUN) --epochs 20 --size 128 --scale-min 0.75 --scale-max 1.25 \
		--no-pretrained --optimizer adamw --lr 1e-3 --scheduler cosine --seed 0
	$(RESUNET) evaluate $(DEMO_RUN)/best.pt --data-root $(DEMO_DATA) --split val --json $(DEMO_RUN)/eval.json \
		--confusion $(DEMO_RUN)/confusion.png
	$(RESUNET) predict $(DEMO_RUN)/best.pt "$(DEMO_DATA)/VOCdevkit/VOC2012/JPEGImages/demo_val_0000*.jpg" \
		--out $(DEMO_RUN)/predictions --overlay
	$(RESUNET) visualize $(DEMO_RUN)/best.pt --data-root $(DEMO_DATA) --out $(DEMO_RUN)/grid.png
	@echo "demo done: see $(DEMO_RUN)/ (metrics.jsonl, curves.png, grid.png, predictions/)"

test: install-dev
	$(PY) -m pytest -q

benchmark: install-dev
	$(RESUNET) benchmark --json benchmarks/latest.json

clean:
	rm -rf runs/demo data/demo .pytest_cache
