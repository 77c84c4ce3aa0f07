# Every target bootstraps .venv (created when missing, reused when present) and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= demo_work

.PHONY: demo demo-quick demo-ocr test bench lint browser ocr-engine clean rehearsal rehearsal-full

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency list changes; torch/torchvision pins come from pyproject.toml.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's Chromium for the real-browser test; the test skips with a reason if this could not install it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	  || echo "warning: could not install chromium; the browser test will skip"; }

# Debian's Tesseract language data (French + English) for `prodcat ocr` (tesserocr from PyPI brings the library) and
# the DejaVu fonts of the rendered covers; without them the OCR tests skip with a reason and the rest of prodcat works.
ocr-engine:
	@{ ls /usr/share/tesseract-ocr/*/tessdata/fra.traineddata && ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf; } >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr tesseract-ocr-fra tesseract-ocr-eng fonts-dejavu-core) >/dev/null 2>&1 \
	  || echo "warning: could not install tesseract-ocr/fonts-dejavu-core; prodcat ocr and its tests will say how (apt-get install tesseract-ocr tesseract-ocr-fra)"; }

demo: $(STAMP) ocr-engine
	$(VENV)/bin/prodcat demo --workdir $(WORKDIR)

# OCR + text fusion on `make demo`'s work dir, kept out of `make demo` (its 5-minute budget): reading the demo's
# text-likely pictures took ~8 min on the 2 shared cores (measured), then one text model beside each softmax seed.
demo-ocr: $(STAMP) ocr-engine
	$(VENV)/bin/prodcat ocr --workdir $(WORKDIR) --select text_likely
	for seed in 0 1 2; do \
	  $(VENV)/bin/prodcat text-head --run $(WORKDIR)/runs/compare-softmax-adamw-s$$seed --overwrite || exit 1; done

demo-quick: $(STAMP)
	$(VENV)/bin/prodcat demo --workdir $(WORKDIR)-quick --quick

test: $(STAMP) browser ocr-engine
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The scale rehearsal (not part of `make test`; docs/scale.md). The real taxonomy and long tail are used when
# Kaggle's reference files are present in REAL_DIR, else a synthetic tree of the same shape and the fitted tail.
REAL_DIR ?= ../shared/data/cdiscount
REAL_FLAGS := $(if $(wildcard $(REAL_DIR)/category_names.csv),--taxonomy-csv $(REAL_DIR)/category_names.csv) \
	$(if $(wildcard $(REAL_DIR)/images_per_category.json),--counts-json $(REAL_DIR)/images_per_category.json)

# 5,270 leaves on pictures, end to end (<= 45 minutes on 2 quiet cores at the default sizes).
rehearsal: $(STAMP)
	$(VENV)/bin/prodcat rehearsal --workdir $(WORKDIR)-rehearsal $(REAL_FLAGS)

# The full row counts without pictures: ~40 GB of float16 features (train + test rows) under $(WORKDIR)-rehearsal-full.
rehearsal-full: $(STAMP)
	$(VENV)/bin/prodcat rehearsal-full --workdir $(WORKDIR)-rehearsal-full $(REAL_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(WORKDIR) $(WORKDIR)-quick .pytest_cache
