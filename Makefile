# The two commands of the README:
#   make run    set up .venv if needed, then run the embedded default job
#   make test   set up .venv if needed, then run the whole test suite
VENV ?= .venv
export VLLM_CPU_KVCACHE_SPACE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

run: setup
	$(VENV)/bin/threadweaver run --config experiments/pipeline_tiny.yaml reuse=true

test: setup
	$(VENV)/bin/python -m pytest -q -ra --durations=25

clean:
	rm -rf runs .pytest_cache .hypothesis
