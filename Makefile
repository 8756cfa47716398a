# pfl: set-up, main job and tests. Every install uses constraints.txt (CPU torch 2.13.0,
# torchvision 0.28.0, mlflow 3.17.2).
PYTHON ?= python3
VENV ?= .venv
SHARED_DATA ?= ../shared/data
DATA_DIR ?= data
CONFIG ?= configs/fedfomo_cifar10_pr0.2.yaml
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data main test docs docs-serve ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

# Extract the real archives into ./data (each skipped when already there): full CIFAR-10,
# reduced CIFAR-100 and Tiny-ImageNet-200.
data: $(DATA_DIR)/cifar-10-batches-py/test_batch $(DATA_DIR)/cifar-100-python/meta \
      $(DATA_DIR)/tiny-imagenet-200/wnids.txt

$(DATA_DIR)/cifar-10-batches-py/test_batch: ARCHIVE = cifar-10-python.tar.xz
$(DATA_DIR)/cifar-100-python/meta: ARCHIVE = cifar-100-python-subset.tar.xz
$(DATA_DIR)/tiny-imagenet-200/wnids.txt: ARCHIVE = tiny-imagenet-200-subset.tar.xz
$(DATA_DIR)/cifar-10-batches-py/test_batch $(DATA_DIR)/cifar-100-python/meta $(DATA_DIR)/tiny-imagenet-200/wnids.txt:
	mkdir -p $(DATA_DIR)
	tar -xJf $(SHARED_DATA)/$(ARCHIVE) -C $(DATA_DIR)
	touch $@

# The main job: FedFomo on full CIFAR-10 (20 clients, pathological, join ratio 0.2),
# tracked in ./mlflow.db. Extra overrides: make main ARGS="global_rounds=10".
main: setup data
	PFL_DATA_DIR=$(DATA_DIR) $(BIN)/pfl train --config $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The documentation site (mkdocs.yml, docs/) into ./site; the reference pages are generated from the code
# (docs/gen_reference.py). --strict: a broken link, a page missing from the nav or a warning fails the build.
# (The two variables silence a plugin's banner about MkDocs 2, which is not a build warning.)
MKDOCS := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs

docs: setup
	$(MKDOCS) build --strict

docs-serve: setup
	$(MKDOCS) serve --dev-addr 127.0.0.1:8000

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf .pfl_cache .pytest_cache site
