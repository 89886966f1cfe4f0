# The two set-up commands on a fresh machine are `make convert` and `make test`;
# both create .venv with pip on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip --disable-pip-version-check
# The default SRC is the chained demo (scripts/chain_demo.py): a ~640 MB release whose widths chain end to
# end, so `python -m reference synthesize` runs on its bundle; generated from demo/chain/ (a few MB) into
# CHAIN_DEMO when missing or older than demo/chain/.  SRC=... converts any other release as before.
CHAIN_DEMO := build/demo-chain
SRC    ?= $(CHAIN_DEMO)
OUT    ?= canonical
INDEXTTS2_INFERENCE := indextts2-inference==2.1.1
INDEXTTS25_INFERENCE := indextts25-inference==0.2.0
# torchaudio's kaldi.py and functional.py, the oracles of reference/front_ends.py (tests/test_front_ends.py
# loads them as single files) and of tests/upstream/e2e.py (infer_v2's Resample and kaldi.fbank, run inside
# upstream's own inference): no torchaudio build matches our torch, so its files go beside the venv.
TORCHAUDIO_SIDE := torchaudio==2.11.1

.PHONY: convert test test-slow check golden bench demo clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps $(INDEXTTS2_INFERENCE) $(INDEXTTS25_INFERENCE)
	rm -rf $(VENV)/torchaudio-side
	$(PIP) install -q --no-deps --target $(VENV)/torchaudio-side $(TORCHAUDIO_SIDE)
	touch $@

$(CHAIN_DEMO)/.built: $(VENV)/.runtime scripts/chain_demo.py $(shell find demo/chain -type f 2>/dev/null)
	$(PY) scripts/chain_demo.py build $(CHAIN_DEMO)
	touch $@

convert: $(VENV)/.runtime $(if $(filter $(CHAIN_DEMO),$(SRC)),$(CHAIN_DEMO)/.built)
	$(PY) convert.py all --src $(SRC) --out $(OUT)

check: $(VENV)/.runtime
	$(PY) convert.py check $(OUT)

# Golden activations for ports: OUT/golden/<file>, computed by the reference runtime.
golden: $(VENV)/.runtime
	$(PY) convert.py golden $(OUT)

# Two pytest workers (pytest-xdist): the suite is CPU-bound and the build machines have 2 cores.
TEST_WORKERS ?= 2
# `make test` leaves out the tests marked slow (pyproject.toml) and runs two kinds in a bounded form:
# the two end-to-end tests (w2v-bert features of an identical input reused) and the property tests
# (a quarter of the examples, derandomized).  `make test-slow` runs the slow tests and those two kinds in full
# (INDEXTTS_TEST_FULL=1).  CI runs both.
test: $(VENV)/.dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" tests

test-slow: $(VENV)/.dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m slow tests
	INDEXTTS_TEST_FULL=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "e2e or fuzz" -k "end_to_end or test_fuzz" tests

# Full-size synthetic inputs (~7 GB, generated once into BENCH_CACHE) and the
# measurements of issue 8; results in bench-results/.  Not a test: CI does not run it.
# BENCH_RELEASE=2.5: the same on a synthetic IndexTTS-2.5 release (another ~6.6 GB).
BENCH_CACHE ?= bench-cache
BENCH_RELEASE ?= 2.0
bench: $(VENV)/.dev
	$(PY) -m bench.run --cache $(BENCH_CACHE) --results bench-results --release $(BENCH_RELEASE)

# Regenerate the committed demo releases (IndexTTS-2.0 and 2.5) from the upstream classes, and the
# chained demo's snapshot (demo/chain/) from tests/upstream/chain.py.
demo: $(VENV)/.dev
	$(PY) scripts/make_demo.py demo/release
	$(PY) scripts/make_demo_2_5.py demo/release-2.5
	$(PY) scripts/chain_demo.py snapshot --dir demo/chain

clean:
	rm -rf $(OUT) $(CHAIN_DEMO) $(CHAIN_DEMO).partial-*
