# One entry point for users and CI. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install run demo test test-fast proto bench bench-quick frontier frontier-quick gpu-check models models-eval clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The pinned CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The default target (SmolLM2-135M-Instruct) is fetched and converted once into the cache folder
# ($SPECCASCADE_CACHE, else ~/.cache/speccascade); later runs find it and return at once.
install: $(STAMP)
	$(BIN)/python -m speccascade.models.fetch

run: install        ## start the service (gRPC :9000, OpenAI-compatible HTTP :8000) on the default pair
	$(BIN)/speccascade serve

demo: install       ## in-process generation on the default pair, all four modes
	for mode in target draft speculative cascade; do \
	  $(BIN)/speccascade generate "def fibonacci(n):" --mode $$mode --max-new-tokens 48 || exit 1; done

test: install       ## the whole suite, as CI runs it
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## everything but the Ray Serve end-to-end tests
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

proto: install      ## regenerate services/speccascade/v1 from proto/ (also done by every install)
	$(BIN)/python services/speccascade/protogen.py

bench: install      ## issue 23/24 goals, both transports, CPU per process: BENCHMARKS.md, JSON, plots (≤ 40 min; bench-quick prints the estimate)
	$(BIN)/speccascade bench

bench-quick: install
	$(BIN)/speccascade bench --quick

frontier: install   ## cascade quality–latency frontier: benchmarks/frontier.* (time it first: speccascade bench frontier --estimate-only)
	$(BIN)/speccascade bench frontier --out benchmarks --markdown benchmarks/frontier.md --readme README.md
	$(BIN)/speccascade bench report   # BENCHMARKS.md with the frontier section

frontier-quick: install
	$(BIN)/speccascade bench frontier --quick

# The slab KV cache on a device: the architecture/runner tests there (float64, exact), then
# benchmarks/gpu_check.py in DTYPE on the tiny and default pairs (runner, engine, service) and a
# timing table in benchmarks/gpu_check-DEVICE.md. At most 8 minutes. DEVICE=cpu is the dry run.
DEVICE ?= cuda
DTYPE  ?= bfloat16
gpu-check: install  ## runner + service checks with device $(DEVICE), $(DTYPE); writes a timing table
	timeout 480 sh -c 'SPECCASCADE_TEST_DEVICE=$(DEVICE) $(BIN)/python -m pytest -q tests/test_kvcache.py && \
	  PYTHONPATH=services $(BIN)/python benchmarks/gpu_check.py --device $(DEVICE) --dtype $(DTYPE) \
	    --out benchmarks/gpu_check-$(DEVICE).md'

models: install     ## distill the default draft from the target (resumable; about 70 min here at two threads, of which 35 generating)
	$(BIN)/speccascade models build --threads 2

models-eval: install
	$(BIN)/speccascade models eval --tasks 200 --out services/speccascade/assets/default_pair/card.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
