# adaptd — the two commands a newcomer needs:
#   make demo   set everything up, then run the main job on the embedded default
#   make test   set everything up, then run every test
# Set-up (deploy/setup.sh) is idempotent: the second time it only checks stamps.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON := .venv/bin/python

.PHONY: help setup build demo test bench
help:
	@echo "make demo   set up, then run the demo on the reference bundles"
	@echo "make test   set up, then run all tests"
	@echo "make setup  only the set-up (venv with the ML runtimes, Mosquitto, reference bundles)"
	@echo "make bench  benchmarks, ours and the references side by side"

setup:
	@deploy/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

demo: setup
	$(CARGO) run -q -p adaptd -- demo

test: setup
	$(CARGO) test --workspace
	$(PYTHON) -m unittest discover -s deploy/export/tests

bench: setup
	$(CARGO) bench -p adaptd --bench serving
	$(PYTHON) benches/compare_training.py
	$(CARGO) bench -p adaptd --bench time_to_adapt
	benches/ingest_throughput.sh
