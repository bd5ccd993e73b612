# The two quick-start commands (README): `make demo` and `make test`.
# Each creates .venv on first use, installs vfiomig (building its C core) and runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install demo test lint typecheck bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vfiomig demo

# The pure-Python core (VFIOMIG_PUREPYTHON=1) runs every integration and e2e test that
# reaches code only it runs: the core a receiver selects (Framer, ReorderBuffer, Budget)
# and what the sinks do without the C core (FdSink's blocking-pipe writes from the event
# loop, lists instead of runs), `pump_recv` over real sockets, the receivers the e2e tests
# start (they inherit the variable). Measured: these files, and only these, construct a
# selected core object in-process. Not again under pure: tests/unit (its `core` fixture
# already runs every core test on both cores, ASan/UBSan included), and what never
# touches the selected core: the vfio-user server library, the vfio-user client and its
# libvfio-user tests, the VFIO sink against the fake kernel device, the C reference
# receiver, bench's parser, the systemd units' check, and test_sdist (it builds the
# package from its sdist). The sender selects its core too (Outbox, PacketHeaders,
# SendBuffer): test_send_wire (the same wire bytes from either core),
# test_send_failure (a failed channel resets the others) and test_send_refused (every
# refusal exits 1) run on both.
PURE_TESTS := \
	tests/integration/test_admission.py \
	tests/integration/test_bench_runs.py \
	tests/integration/test_control.py \
	tests/integration/test_control_sessions.py \
	tests/integration/test_faults.py \
	tests/integration/test_hostile.py \
	tests/integration/test_receive.py \
	tests/integration/test_send_failure.py \
	tests/integration/test_send_wire.py \
	tests/integration/test_sinks.py \
	tests/integration/test_soak.py \
	tests/integration/test_vfio_source.py \
	tests/integration/test_vfio_user_sink.py \
	tests/integration/test_vfio_user_source.py \
	tests/e2e/test_cli_receive.py \
	tests/e2e/test_cli_streams.py \
	tests/e2e/test_cli_vfio_source.py \
	tests/e2e/test_control_peer.py \
	tests/e2e/test_libvfio_user_interop.py \
	tests/e2e/test_lifecycle.py \
	tests/e2e/test_send_refused.py \
	tests/e2e/test_sidecar.py \
	tests/e2e/test_socket_activation.py \
	tests/e2e/test_strangers.py \
	tests/e2e/test_vfio_user_config_space.py \
	tests/e2e/test_vfio_user_examples.py

# lint and typecheck first: they fail the build in seconds, before the suite's minutes.
test: lint typecheck
	VFIOMIG_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q
	VFIOMIG_PUREPYTHON=1 $(BIN)/python -m pytest -q $(PURE_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check vfiomig tests benchmarks examples fuzz setup.py
	$(BIN)/ruff format --check vfiomig tests benchmarks examples fuzz setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.compare
	$(BIN)/vfiomig bench --scenario qemu --out bench-results
