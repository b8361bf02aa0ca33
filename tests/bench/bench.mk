# SPDX-License-Identifier: MIT
# Benchmark (issue 8): `make bench [BENCH_SECONDS=N] [BENCH_JSON=1]` builds
# and runs tests/bench/bench.c against a real agent-brokerd and prints one
# table (see docs/performance.md). `make bench-smoke` is the short CI run:
# it proves the benchmark still works, it never judges the figures.
# BENCH_ARGS passes more options (e.g. --only issue,introspect --keep).
BENCH_SECONDS ?= 5
BENCH_JSON    ?=
BENCH_ARGS    ?=
BENCH_BIN     := $(B)/tests/bench
BENCH_FLAGS    = --seconds $(BENCH_SECONDS) $(if $(filter-out 0,$(BENCH_JSON)),--json) $(BENCH_ARGS)

$(BENCH_BIN): tests/bench/bench.c $(B)/libagentbroker.a
	@mkdir -p $(dir $@)
	@echo "CC $@" >&2
	@$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes $(LDFLAGS) -o $@ $(filter %.c %.a,$^) \
	    -lsodium -ljansson -lsystemd -lpam -lm

# The PAM row needs $(B)/pam_agent_broker.so; without it the row says
# "n/a (module not built)". Try to build it first when pam_module/pam.mk is
# there; a failure only costs that row (make's output goes to stderr so that
# BENCH_JSON=1 prints JSON alone).
.PHONY: bench bench-smoke bench-pam-module
bench-pam-module:
	@if [ -f pam_module/pam.mk ]; then $(MAKE) --no-print-directory $(B)/pam_agent_broker.so >&2 || \
	    echo "bench: $(B)/pam_agent_broker.so did not build; the PAM row will say n/a" >&2; fi

bench: $(B)/agent-brokerd $(BENCH_BIN) bench-pam-module
	@$(BENCH_BIN) $(BENCH_FLAGS)

bench-smoke: $(B)/agent-brokerd $(BENCH_BIN) bench-pam-module
	@$(BENCH_BIN) --seconds 0.3 --sessions 300 --cold-runs 3 $(BENCH_ARGS)
