# Developer entry points for the relay workspace (GNU make).
# `make test` and `make run` install Redis and Postgres from Debian packages
# when they are missing (see deploy/local-stack.sh); `make test` also installs
# nginx and openssl (the tests' load balancer and TLS terminator; no system service is
# started).

STACK := deploy/local-stack.sh

# `make run`: number of gateways and cargo profile (release or debug).
GATEWAYS ?= 1
PROFILE ?= release

# Services for `make run` / `make services-up` (state in target/stack).
REDIS_PORT ?= 6390
PG_PORT ?= 5440
RUN_STATE := target/stack

# Services for `make test` (state in target/test-stack).
TEST_REDIS_PORT ?= 6391
TEST_PG_PORT ?= 5441
TEST_STATE := target/test-stack

.PHONY: help run test chart-check build fmt lint services-up services-down clean-stack bench

# List the targets.
help:
	@echo "make run            build and run the relay locally (GATEWAYS=$(GATEWAYS) PROFILE=$(PROFILE))"
	@echo "make test           start throwaway Redis/Postgres, build and run all tests, stop them"
	@echo "make build          cargo build the workspace"
	@echo "make fmt            cargo fmt --all"
	@echo "make lint           cargo clippy with warnings as errors"
	@echo "make services-up    start Redis ($(REDIS_PORT)) and Postgres ($(PG_PORT)) in $(RUN_STATE)"
	@echo "make services-down  stop them"
	@echo "make clean-stack    stop all local services and delete their state"
	@echo "make chart-check    check the deployment chart (deploy/chart-check.sh)"
	@echo "make bench          load-test a local cluster; report in target/bench/ (BENCH=full for full sizes)"

# Build and run Redis, Postgres, one ingest-worker, one query-worker and
# GATEWAYS gateways in the foreground; Ctrl-C stops everything.
run:
	GATEWAYS=$(GATEWAYS) PROFILE=$(PROFILE) REDIS_PORT=$(REDIS_PORT) PG_PORT=$(PG_PORT) $(STACK) run

# Start fresh, non-durable Redis/Postgres in $(TEST_STATE) (wiped first, so per-test
# databases never pile up), build everything, run
# `cargo test --workspace` against them, and always stop them afterwards; the
# exit status is cargo's (then chart-check's, when deploy/chart-check.sh exists).
test:
	@status=0; \
	trap '$(STACK) services-down $(TEST_STATE) || true' EXIT; \
	trap 'exit 130' INT; \
	trap 'exit 143' TERM; \
	$(STACK) clean $(TEST_STATE) >/dev/null || true; \
	FAST=1 $(STACK) services-up $(TEST_STATE) $(TEST_REDIS_PORT) $(TEST_PG_PORT) || exit $$?; \
	$(STACK) ensure-nginx || exit $$?; \
	eval "$$($(STACK) test-env $(TEST_STATE))" || exit $$?; \
	echo "RELAY_TEST_REDIS_URL=$$RELAY_TEST_REDIS_URL"; \
	echo "RELAY_TEST_DATABASE_URL=$$RELAY_TEST_DATABASE_URL"; \
	cargo build --workspace --all-targets || exit $$?; \
	cargo test --workspace || status=$$?; \
	$(STACK) services-down $(TEST_STATE) || true; \
	trap - EXIT; \
	if [ -f deploy/chart-check.sh ]; then \
		$(MAKE) chart-check || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	fi; \
	exit $$status

# Check the deployment chart.
chart-check:
	bash deploy/chart-check.sh

# Build the workspace (debug).
build:
	cargo build --workspace

# Format all crates.
fmt:
	cargo fmt --all

# Clippy over everything, warnings are errors.
lint:
	cargo clippy --workspace --all-targets -- -D warnings

# Start Redis and Postgres for manual use (same ones as `make run`).
services-up:
	$(STACK) services-up $(RUN_STATE) $(REDIS_PORT) $(PG_PORT)

# Stop the services started by `make services-up` or `make run`.
services-down:
	$(STACK) services-down $(RUN_STATE)

# Stop all local services and delete their state (target/stack, target/test-stack).
clean-stack:
	$(STACK) clean $(RUN_STATE)
	$(STACK) clean $(TEST_STATE)

# Benchmarks (deploy/bench.sh): release build, durable Redis/Postgres in target/bench-stack,
# a cluster of 2 gateways and 1 worker of each kind, the relay-bench scenarios, and
# target/bench/report.md + report.json. Short profile by default; `make bench BENCH=full`
# for the sizes the targets are stated for. Everything started is stopped afterwards.
bench:
	BENCH="$(BENCH)" bash deploy/bench.sh
