# Thin wrapper over CMake for the README's commands.
#   make run     install missing Debian packages, build, train the default model (v3
#                strategy, a few minutes on two cores) into $(RUN_DIR): progress, then
#                validation loss, MaxVio over the validation set and a generated sample;
#                ends with the run's report (dsmoe report), whose path it prints
#   make simulate  the balancing simulation (dsmoe simulate) on its default traffic
#   make test    install missing Debian packages, build, run the whole test suite
#                (Release + AddressSanitizer/UBSan + clang -Werror build + fuzz smoke
#                + install check + clang-tidy/cppcheck)
#   make         build build/dsmoe and libdsmoe (Release)
#   make install [PREFIX=/usr/local]
#   make bench   benchmarks against PyTorch / NumPy / OpenBLAS (installs python3-torch)
#   make lint    clang-tidy + cppcheck over src/, tools/, tests/ (prints "lint: clean")
BUILD ?= build
PREFIX ?= /usr/local
JOBS ?= 2
FUZZ_SECONDS ?= 20
CMAKE_FLAGS ?=
RUN_DIR ?= runs/default
TRAIN_FLAGS ?=

.PHONY: all build deps run simulate test test-release test-asan test-clang fuzz-smoke install bench lint clean

all: build

deps:
	@bash scripts/install-deps.sh

build:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(PREFIX) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

# OpenMP threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=passive unless
# set): on a machine shared with other work, spinning threads made training several times
# slower (measured: 150 against 1,100 tokens/s on two busy cores).
run: deps build
	rm -rf $(RUN_DIR)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} \
	  ./$(BUILD)/dsmoe train --preset default --strategy v3 --out $(RUN_DIR) $(TRAIN_FLAGS)
	./$(BUILD)/dsmoe report $(RUN_DIR)

simulate: deps build
	./$(BUILD)/dsmoe simulate

test: deps
	bash scripts/test.sh

test-release: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

install: build
	cmake --install $(BUILD)

bench: build
	@bash scripts/install-deps.sh bench
	bash bench/run_all.sh $(BUILD)

lint:
	bash scripts/lint.sh $(BUILD)

clean:
	rm -rf build build-asan build-clang build-fuzz
