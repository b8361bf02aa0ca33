# SPDX-License-Identifier: MIT
# libFuzzer targets (clang): `make fuzz FUZZ_SECONDS=N` runs each for N
# seconds (default 10) on a copy of its seed corpus in tests/fuzz/corpus/.
# The seeds, and every crash input saved there, also run in `make check`
# through tests/unit/test-fuzz-corpus.c.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 10
FUZZ_B       := $(B)/fuzz
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -D_GNU_SOURCE \
                $(shell $(PKG_CONFIG) --cflags $(DEPS))
FUZZ_LIBS    := $(shell $(PKG_CONFIG) --libs $(DEPS)) -llmdb
FUZZ_TARGETS := varlink jwt policy pam_args $(FUZZ_EXTRA_TARGETS)
FUZZ_COMMON  := common/frame.c common/varlink.c common/jwt.c common/b64.c common/util.c common/error.c

$(FUZZ_B)/fuzz-varlink: tests/fuzz/fuzz-varlink.c $(FUZZ_COMMON)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ $(FUZZ_LIBS)

$(FUZZ_B)/fuzz-jwt: tests/fuzz/fuzz-jwt.c $(FUZZ_COMMON)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ $(FUZZ_LIBS)

$(FUZZ_B)/fuzz-policy: tests/fuzz/fuzz-policy.c broker/policy.c $(FUZZ_COMMON)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ $(FUZZ_LIBS)

$(FUZZ_B)/fuzz-pam_args: tests/fuzz/fuzz-pam_args.c pam_module/args.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ $(FUZZ_LIBS)

# test-fuzz-corpus replays the pam_args corpus too: it links the parser.
$(B)/tests/test-fuzz-corpus: $(B)/obj/pam_module/args.o

.PHONY: fuzz fuzz-build
fuzz-build: $(FUZZ_TARGETS:%=$(FUZZ_B)/fuzz-%)

# Each target runs on a scratch copy of its corpus (new inputs stay out of
# git); a crash writes crash-* into tests/fuzz/corpus/TARGET/ so that it
# becomes a regression input at once.
fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
	    work=$$(mktemp -d); cp tests/fuzz/corpus/$$t/* $$work/ 2>/dev/null || true; \
	    echo "=== fuzz-$$t for $(FUZZ_SECONDS) s"; \
	    $(FUZZ_B)/fuzz-$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
	        -artifact_prefix=tests/fuzz/corpus/$$t/ -print_final_stats=1 $$work > $$work.log 2>&1 && rc=0 || rc=$$?; \
	    grep -E 'stat::number_of_executed_units|stat::peak_rss|ERROR|SUMMARY|Done' $$work.log || true; \
	    rm -rf $$work $$work.log; [ "$$rc" = 0 ] || exit $$rc; \
	done
