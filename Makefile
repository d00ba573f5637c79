# Two entry points, each doing its own set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python
# Local data (Omniglot, MNIST, Fashion-MNIST); missing Omniglot is downloaded into ~/.cache/bilevel instead.
export BILEVEL_DATA ?= $(abspath ../shared/data)
export NO_MKDOCS_2_WARNING = 1

.PHONY: install demo test lint docs docs-build

install: .installed

# torch first, pinned: the local CPU build (an unpinned torch pulls a multi-GB CUDA build).
.installed: pyproject.toml
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test,docs]"
	PYTHON=$(PYTHON) bash tools/install_learn2learn.sh   # its sdist does not build as shipped (see the script)
	touch $@

# Each demo run gets its own folder (runs/omniglot/demo-<UTC time>): a run never replaces another. glibc keeps the
# memory it frees (no page faults on every task's activations: 1.2x, see "The memory allocator" in docs/benchmarks.md).
demo: install
	MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \
	$(PYTHON) examples/omniglot_fewshot.py run.name=demo-$$(date -u +%Y%m%d-%H%M%S)

test: install
	$(PYTHON) -m pytest -q

lint: install   # pyflakes and pycodestyle at 120 columns (pyproject.toml, [tool.ruff])
	$(PYTHON) -m ruff check .

# The documentation site (mkdocs.yml, docs/): serve it at http://127.0.0.1:8000, or build it into site/ as CI does.
docs: install
	$(PYTHON) -m mkdocs serve

docs-build: install
	$(PYTHON) -m mkdocs build --strict
