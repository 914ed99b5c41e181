# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RESUNET := $(VENV)/bin/resunet
DATA ?= ../shared/camvid

.PHONY: install install-dev demo test benchmark precision-check camvid camvid-seed camvid-gpu camvid-tta camvid-export camvid-ablate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Generated VOC-format data → train (CPU, bf16 where it has it; or a GPU) → evaluate → predict → grid → ONNX export.
# EfficientNet-Lite0 with the ImageNet weights bundled in a pinned package: it learns the shapes in a few short
# epochs on every CPU kind, so the whole demo fits in about 4 minutes from a fresh clone, install included.
DEMO_DATA := data/demo
DEMO_RUN := runs/demo
# Class weights matter here: the shapes cover ~15% of the pixels, and without them the pretrained model spends its few
# steps on the background.
DEMO_EPOCHS ?= 5
demo: install
	$(RESUNET) demo-data $(DEMO_DATA) --train 96 --val 24 --size 128 --seed 0
	$(RESUNET) train --data-root $(DEMO_DATA) --out $(DEMO_RUN) --overwrite --epochs $(DEMO_EPOCHS) --size 128 --scale-min 0.75 \
		--scale-max 1.25 --encoder efficientnet-lite0 --optimizer adamw --lr 2e-3 --scheduler cosine \
		--class-weights sqrt-inv-freq --eval-every 2 --seed 0
	$(RESUNET) evaluate $(DEMO_RUN)/best.pt --data-root $(DEMO_DATA) --split val --json $(DEMO_RUN)/eval.json \
		--confusion $(DEMO_RUN)/confusion.png
	$(RESUNET) predict $(DEMO_RUN)/best.pt "$(DEMO_DATA)/VOCdevkit/VOC2012/JPEGImages/demo_val_0000*.jpg" \
		--out $(DEMO_RUN)/predictions --overlay
	$(RESUNET) visualize $(DEMO_RUN)/best.pt --data-root $(DEMO_DATA) --out $(DEMO_RUN)/grid.png
	$(RESUNET) export $(DEMO_RUN)/best.pt --onnx $(DEMO_RUN)/model.onnx --data-root $(DEMO_DATA)
	@echo "demo done: see $(DEMO_RUN)/ (metrics.jsonl, curves.png, grid.png, predictions/, model.onnx)"
	@echo "predict with the exported file: $(RESUNET) predict $(DEMO_RUN)/model.onnx IMAGES --out DIR"
	@echo "serve it (page at http://127.0.0.1:8000/): $(RESUNET) serve $(DEMO_RUN)/model.onnx"

# The serve tests drive Debian's chromium through Playwright (Playwright's own browser download needs the internet).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

# Two pytest-xdist workers, one file each at a time (a file's fixtures are built once): on two cores the suite takes
# about two thirds of the time of one process, much of which waits on subprocesses' imports, servers and browsers.
# The trained model and its exports are built once for both, and files are handed out longest first
# (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install-dev $(CHROMIUM)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

benchmark: install-dev
	$(RESUNET) benchmark --json benchmarks/latest.json

# fp32 vs bf16 training and evaluation on the demo data: a ResNet34-UNet from scratch, the demo's recipe before it
# moved to a pretrained Lite0 (accuracy, not speed).
precision-check: install
	$(PY) benchmarks/precision_check.py --out runs/precision

clean:
	rm -rf runs/demo data/demo .pytest_cache

# ---- CamVid (real road scenes, 11 classes; ../shared/camvid by default) -------------------------------------------
# The CPU recipe: EfficientNet-Lite0 U-Net from the ImageNet weights bundled with the package, cross-entropy + Dice,
# as many epochs as fit CAMVID_TIME_BUDGET of training (at most CAMVID_EPOCHS; the cosine schedule spans the fitted
# count), selected on val, evaluated at full 480×360: the whole target in under 60 minutes on any of our 2-core CPUs.
# `make camvid CAMVID_SIZE=360 CAMVID_CROP=320` sets the working size and crop by hand, CAMVID_SEED=1 another seed,
# CAMVID_FLAGS="--attention scse" adds training options (an option measured at the full budget, not just in the ablation).
# CAMVID_TIME_BUDGET= (empty) trains exactly CAMVID_EPOCHS, the same number on every CPU (size and precision still
# follow the CPU, as below).
# A run folder that holds a run is not trained over: give another CAMVID_RUN, or OVERWRITE=1 to start it over (a
# stopped run goes on with `resunet train --resume RUN/last.pt`).
CAMVID_RUN ?= runs/camvid
CAMVID_EPOCHS ?= 55
CAMVID_LOSS ?= ce+dice
CAMVID_TIME_BUDGET ?= 55m
# The working size by CPU kind. Without bf16 that pays, the hour is bounded by epochs, and 288/256 fits nearly twice
# as many as 360/320 (AMD EPYC Zen 3, fp32: 27 against 15 epochs, val mIoU 66.91% against 55.10%); where bf16 runs
# faster than fp32 (AMX, or avx512_bf16 on the Zen 4) 360/320, which reached 72.33% and 73.08% on the Zen 4 EPYC; on a
# slower day the two sizes came within noise of each other (288/256: 51 epochs, 70.54%; 360/320: 38 epochs, 69.86%).
# 360/256 costs what 288/256 does and, given 55 epochs, scores within noise of it (70.51% against 70.35%). An Intel
# Xeon with avx512_bf16 whose AMX is hidden runs bf16 no faster than fp32, so it trains 288/256 in fp32 (RESULTS.md).
# Asked of runtime.cpu_bf16_pays itself (one rule for the trainer's --precision auto and the Makefile), when a recipe
# first needs it: make expands a recipe after its prerequisites, so the venv exists by then; the $(eval) keeps the
# answer for the run.
BF16_PAYS = $(eval BF16_PAYS := $(shell $(PY) -c 'from resunet.runtime import cpu_bf16_pays; print("yes" if cpu_bf16_pays() else "")' 2>/dev/null))$(BF16_PAYS)
CAMVID_SIZE ?= $(if $(BF16_PAYS),360,288)
CAMVID_CROP ?= $(if $(BF16_PAYS),320,256)
CAMVID_SEED ?= 0
# An exponential moving average of the weights (--ema), evaluated, selected and saved: its val curve rises to the last
# epoch, where without it best.pt was a noisy peak picked on val (RESULTS.md). CAMVID_EMA=0 turns it off.
CAMVID_EMA ?= 0.999
CAMVID_FLAGS ?=
OVERWRITE ?=
# OVERWRITE=0 (as CAMVID_EMA=0 means off) keeps the run: only 1, yes or true start it over
START = $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite)
CAMVID_COMMON = --data-root $(DATA) --size $(CAMVID_SIZE) --crop-size $(CAMVID_CROP) --scale-min 0.75 --scale-max 1.5 --batch-size 8 \
	--optimizer adamw --lr 1e-3 --weight-decay 1e-4 --scheduler cosine --warmup-epochs 1 --class-weights sqrt-inv-freq \
	--seed $(CAMVID_SEED)
# What make camvid and camvid-seed share beyond the data and optimiser: the loss and the schedule's length.
CAMVID_SCHEDULE = --epochs $(CAMVID_EPOCHS) --loss $(CAMVID_LOSS) --eval-every 3 \
	$(if $(CAMVID_TIME_BUDGET),--time-budget $(CAMVID_TIME_BUDGET))
camvid: install
	$(RESUNET) train $(CAMVID_COMMON) --out $(CAMVID_RUN) $(START) --encoder efficientnet-lite0 $(CAMVID_SCHEDULE) \
		--ema $(CAMVID_EMA) $(CAMVID_FLAGS)
	$(RESUNET) evaluate $(CAMVID_RUN)/best.pt --data-root $(DATA) --split val --json $(CAMVID_RUN)/val.json \
		--confusion $(CAMVID_RUN)/confusion.png
	$(RESUNET) evaluate $(CAMVID_RUN)/best.pt --data-root $(DATA) --split val --tta flip --json $(CAMVID_RUN)/val_flip.json

# What pretraining is worth: the seed's ResNet34-UNet from scratch, same data, augmentation, loss and time budget
# (at most 55 epochs: fewer fit than for the Lite0 U-Net in fp32 and on the Zen 4, all 55 on the AMX Xeon; RESULTS.md).
CAMVID_SEED_RUN ?= runs/camvid-seed
camvid-seed: install
	$(RESUNET) train $(CAMVID_COMMON) --out $(CAMVID_SEED_RUN) $(START) --encoder resnet34 --no-pretrained \
		$(CAMVID_SCHEDULE)
	$(RESUNET) evaluate $(CAMVID_SEED_RUN)/best.pt --data-root $(DATA) --split val --json $(CAMVID_SEED_RUN)/val.json

# The GPU recipe: full resolution, long schedule, the larger Lite2 encoder (needs resunet[lite]).
CAMVID_GPU_RUN ?= runs/camvid-gpu
camvid-gpu: install-dev
	$(RESUNET) train --data-root $(DATA) --out $(CAMVID_GPU_RUN) $(START) --encoder efficientnet-lite2 --size 360 --crop-size 352 \
		--scale-min 0.5 --scale-max 2.0 --batch-size 16 --optimizer adamw --lr 1e-3 --weight-decay 1e-4 \
		--scheduler cosine --warmup-epochs 5 --class-weights sqrt-inv-freq --epochs 300 --eval-every 5 --seed 0
	$(RESUNET) evaluate $(CAMVID_GPU_RUN)/best.pt --data-root $(DATA) --split val --tta flip --json $(CAMVID_GPU_RUN)/val.json

# Inference options on the CamVid model (after `make camvid`): mIoU and img/s for none / flip / ms / ms+flip / window,
# then the model exported to INT8 ONNX (calibrated on 64 training images; its fp32 copy parity-checked) and
# evaluated on val.
camvid-tta: install
	$(PY) benchmarks/tta_table.py $(CAMVID_RUN)/best.pt --data-root $(DATA) --window 320 --stride 240 \
		--json $(CAMVID_RUN)/tta.json
camvid-export: install
	$(RESUNET) export $(CAMVID_RUN)/best.pt --onnx $(CAMVID_RUN)/model.int8.onnx --int8 --calibration $(DATA) \
		--data-root $(DATA) --json $(CAMVID_RUN)/export-int8.json

# What each training option is worth (resunet ablate): the recipe above with cross-entropy (make camvid's loss before
# it moved to cross-entropy + Dice, which is a row) at a fixed budget of ABLATE_EPOCHS epochs, one option changed per
# row, plus the baseline at a second seed for the noise; final weights scored on val. About 30 min a row on a 2-core
# CPU (14 rows); stop it any time, run it again to continue (finished rows are kept).
# ABLATE_OPTIONS="loss ce+dice; ema 0.999" runs only those rows (names as in `resunet ablate --help`).
ABLATE_EPOCHS ?= 15
ABLATE_OPTIONS ?=
CAMVID_ABLATION ?= runs/camvid-ablation
camvid-ablate: install
	$(RESUNET) ablate $(CAMVID_COMMON) --encoder efficientnet-lite0 --epochs $(ABLATE_EPOCHS) --out $(CAMVID_ABLATION) \
		$(if $(ABLATE_OPTIONS),--options "$(ABLATE_OPTIONS)")
