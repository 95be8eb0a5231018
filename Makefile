# adaptd — the two commands a newcomer needs:
#   make demo   set everything up, then run the main job on the embedded default
#   make test   set everything up, then run every test
# Set-up (deploy/setup.sh) is idempotent: the second time it only checks stamps.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON := .venv/bin/python

.PHONY: help setup build demo test bench fuzz deb-arm64 check-arm64
help:
	@echo "make demo   set up, then run the demo on the reference bundles"
	@echo "make test   set up, then run all tests"
	@echo "make setup  only the set-up (venv with the ML runtimes, Mosquitto, reference bundles)"
	@echo "make bench  benchmarks, ours and the references side by side"
	@echo "make fuzz   the decoders' property tests, long (PROPTEST_CASES=$(FUZZ_CASES) per property)"
	@echo "make deb-arm64    cross-build the arm64 (Jetson) .deb; make check-arm64 runs it under emulation"

setup:
	@deploy/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

demo: setup
	$(CARGO) run -q -p adaptd -- demo

# The unit tests of everything but the trainer build without libtorch (`LIBTORCH` points nowhere,
# so the build fails if anything links it) and run without the set-up; then the whole suite.
UNIT_CRATES := -p adaptd-daemon -p adaptd-train -p adaptd-adapters -p adaptd-protocol -p adaptd-fleet
test: setup
	$(CARGO) fmt --all --check
	LIBTORCH=/nonexistent $(CARGO) clippy -q $(UNIT_CRATES) --lib --no-default-features -- -D warnings
	LIBTORCH=/nonexistent $(CARGO) test -q $(UNIT_CRATES) --lib --no-default-features
	$(CARGO) clippy --workspace --all-targets -q -- -D warnings
	$(CARGO) test --workspace
	$(PYTHON) -m unittest discover -s deploy/export/tests
	$(PYTHON) benches/shifts.py --quick --daemon target/debug/adaptd

# The property tests over every decoder of outside input; `make test` runs 256 cases of each.
FUZZ_CASES ?= 20000
fuzz: setup
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p adaptd --test integration -- properties --nocapture

bench: setup
	$(CARGO) build --release -p adaptd
	$(PYTHON) benches/shifts.py
	$(CARGO) bench -p adaptd --bench serving
	$(PYTHON) benches/compare_training.py
	$(PYTHON) benches/compare_loreft.py
	$(PYTHON) benches/norm_statistics.py
	$(CARGO) bench -p adaptd --bench time_to_adapt
	benches/ingest_throughput.sh
	benches/fleet_idle.sh
	$(CARGO) bench -p adaptd --bench chaos
	$(CARGO) bench -p adaptd --bench faults
	$(CARGO) bench -p adaptd --bench fleet
	$(CARGO) bench -p adaptd --bench fleet_learning

# Jetson: cross-build the arm64 .deb (installs Rust's aarch64 standard library and Debian's cross
# compilers where missing), then run the arm64 binary's checks under QEMU. Not part of `make test`.
deb-arm64: setup
	deploy/jetson/cross-build.sh

check-arm64: deb-arm64
	deploy/jetson/emulated-check.sh
