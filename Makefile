# SPDX-License-Identifier: MIT
# agent-broker: plain Makefile. `make`, `make check`, `make check-asan`,
# `make install DESTDIR=... PREFIX=...`, `make demo`.

VERSION    := 0.1.0
PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
SBINDIR    ?= $(PREFIX)/sbin
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR     ?= $(PREFIX)/share/man
DATADIR    ?= $(PREFIX)/share
SYSCONFDIR ?= /etc
UNITDIR    ?= /lib/systemd/system
PAMDIR     ?= /lib/security

B          ?= build
CC         ?= cc
PKG_CONFIG ?= pkg-config
DEPS       := libsystemd libsodium jansson
SAN        ?=

WARN      := -Wall -Wextra -Werror -Wshadow -Wpointer-arith -Wformat=2 -Wstrict-prototypes \
             -Wmissing-prototypes -Wno-unused-parameter -Wno-format-truncation
HARDEN    := -fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIC
OPT       ?= -O2 -g
ifeq ($(SAN),thread)
OPT       := -O1 -g -fno-omit-frame-pointer -fsanitize=thread
HARDEN    := -fstack-protector-strong -fPIC
else ifneq ($(SAN),)
OPT       := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
HARDEN    := -fstack-protector-strong -fPIC
endif
CFLAGS    ?=
CPPFLAGS  += -D_GNU_SOURCE
ALL_CFLAGS = -std=gnu11 $(OPT) $(WARN) $(HARDEN) $(CPPFLAGS) $(shell $(PKG_CONFIG) --cflags $(DEPS)) $(CFLAGS)
LDLIBS_ALL = $(shell $(PKG_CONFIG) --libs $(DEPS)) -llmdb
LDFLAGS   += -Wl,-z,relro,-z,now -Wl,--as-needed
ifeq ($(SAN),thread)
LDFLAGS   += -fsanitize=thread
else ifneq ($(SAN),)
LDFLAGS   += -fsanitize=address,undefined
endif

COMMON_SRC := $(wildcard common/*.c)
BROKER_SRC := $(wildcard broker/*.c)
CLIENT_SRC := client/client.c
CTL_SRC    := client/agent-brokerctl.c $(wildcard client/ctl-*.c) broker/policy.c

COMMON_OBJ := $(COMMON_SRC:%.c=$(B)/obj/%.o)
BROKER_OBJ := $(BROKER_SRC:%.c=$(B)/obj/%.o)
CLIENT_OBJ := $(CLIENT_SRC:%.c=$(B)/obj/%.o)
CTL_OBJ    := $(CTL_SRC:%.c=$(B)/obj/%.o)
BROKER_LIB_OBJ := $(filter-out $(B)/obj/broker/main.o,$(BROKER_OBJ))

SONAME     := libagentbroker.so.0
PROGS      := $(B)/agent-brokerd $(B)/agent-brokerctl
LIBS       := $(B)/libagentbroker.so $(B)/libagentbroker.a $(B)/agentbroker.pc $(B)/agentbroker.h

UNIT_TESTS := $(patsubst tests/unit/%.c,$(B)/tests/%,$(wildcard tests/unit/test-*.c))
INT_TESTS  := $(patsubst tests/integration/%.c,$(B)/tests/%,$(wildcard tests/integration/test-*.c))
TEST_HELPERS := $(patsubst tests/integration/%.c,$(B)/tests/%,$(wildcard tests/integration/helper-*.c)) \
                $(B)/tests/stall-fdatasync.so

.PHONY: all check check-root check-tsan check-unit check-integration check-asan check-valgrind install clean demo
all: $(PROGS) $(LIBS)

$(B)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -MMD -MP -c -o $@ $<

-include $(shell find $(B)/obj -name '*.d' 2>/dev/null)

$(B)/agent-brokerd: $(BROKER_OBJ) $(COMMON_OBJ)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -pie -o $@ $^ $(LDLIBS_ALL)

$(B)/libagentbroker.so.$(VERSION): $(CLIENT_OBJ) $(COMMON_OBJ) client/libagentbroker.map
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -shared -Wl,-soname,$(SONAME) \
	    -Wl,--version-script=client/libagentbroker.map -o $@ $(CLIENT_OBJ) $(COMMON_OBJ) \
	    $(shell $(PKG_CONFIG) --libs libsodium jansson)

$(B)/libagentbroker.so: $(B)/libagentbroker.so.$(VERSION)
	ln -sf libagentbroker.so.$(VERSION) $(B)/$(SONAME)
	ln -sf $(SONAME) $@

# Internal static archive: the CLI, the PAM module and tests link the same code.
$(B)/libagentbroker.a: $(CLIENT_OBJ) $(COMMON_OBJ)
	rm -f $@ && ar rcs $@ $^

$(B)/agent-brokerctl: $(CTL_OBJ) $(B)/libagentbroker.a
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -pie -o $@ $^ $(shell $(PKG_CONFIG) --libs libsodium jansson)

PC_SED = sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(VERSION)|'

$(B)/agentbroker.pc: client/agentbroker.pc.in Makefile
	$(PC_SED) $< > $@

$(B)/agentbroker.h: client/agentbroker.h
	cp $< $@

# ---- tests -----------------------------------------------------------------
TEST_CFLAGS = $(ALL_CFLAGS) -Wno-missing-prototypes $(shell $(PKG_CONFIG) --cflags cmocka)
TEST_LIBS   = $(shell $(PKG_CONFIG) --libs cmocka) $(LDLIBS_ALL)

$(B)/tests/test-%: tests/unit/test-%.c $(BROKER_LIB_OBJ) $(B)/libagentbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $(LDFLAGS) -o $@ $^ $(TEST_LIBS)

# test-token-call scans what the library frees for copies of a token
$(B)/tests/test-token-call: TEST_LIBS += -Wl,--wrap=free

$(B)/tests/test-%: tests/integration/test-%.c tests/integration/harness.c tests/integration/harness.h $(B)/libagentbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $(LDFLAGS) -o $@ $(filter %.c %.a,$^) $(TEST_LIBS)

$(B)/tests/helper-%: tests/integration/helper-%.c $(B)/libagentbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $(LDFLAGS) -o $@ $^ $(TEST_LIBS)

# LD_PRELOAD into the daemon (test-workers: a disk that stops answering); never sanitized
$(B)/tests/stall-fdatasync.so: tests/integration/stall-fdatasync.c
	@mkdir -p $(dir $@)
	$(CC) -std=gnu11 -O2 $(WARN) -fPIC -shared -o $@ $< -ldl

check: check-root all $(UNIT_TESTS) $(INT_TESTS) $(TEST_HELPERS)
	@B=$(B) tests/run-tests.sh $(UNIT_TESTS) $(INT_TESTS)

# The integration tests fork processes under other uids, mount small tmpfs
# file systems and install a PAM service file: they need root.
check-root:
	@if [ "$$(id -u)" != 0 ]; then \
	    echo "make check needs root: the tests run processes under other uids and mount tmpfs (run: sudo make check)" >&2; \
	    exit 1; fi

check-asan:
	$(MAKE) B=build-asan SAN=1 check

# The same with ThreadSanitizer: the daemon's worker threads (audit sync, crypto).
check-tsan:
	$(MAKE) B=build-tsan SAN=thread check

# The whole suite with valgrind: test programs (and the PAM module they load)
# under memcheck, and every daemon the integration tests start as well.
VALGRIND := valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
            --track-fds=no --child-silent-after-fork=yes
check-valgrind: check-root all $(UNIT_TESTS) $(INT_TESTS) $(TEST_HELPERS)
	@B=$(B) HX_DAEMON_WRAPPER="$(VALGRIND)" AB_TEST_WRAPPER="$(VALGRIND)" tests/run-tests.sh $(UNIT_TESTS) $(INT_TESTS)

install: all
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 0755 $(B)/agent-brokerd $(DESTDIR)$(SBINDIR)/agent-brokerd
	install -m 0755 $(B)/agent-brokerctl $(DESTDIR)$(BINDIR)/agent-brokerctl
	install -m 0644 $(B)/libagentbroker.so.$(VERSION) $(DESTDIR)$(LIBDIR)/
	ln -sf libagentbroker.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libagentbroker.so
	# made here, not copied from $(B): the build may have used another PREFIX
	$(PC_SED) client/agentbroker.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/agentbroker.pc
	chmod 0644 $(DESTDIR)$(LIBDIR)/pkgconfig/agentbroker.pc
	install -m 0644 client/agentbroker.h $(DESTDIR)$(INCLUDEDIR)/agentbroker.h
	install -d $(DESTDIR)$(DATADIR)/bash-completion/completions
	install -m 0644 client/agent-brokerctl.bash $(DESTDIR)$(DATADIR)/bash-completion/completions/agent-brokerctl
	install -d $(DESTDIR)$(SYSCONFDIR)/agent-broker/policy.d $(DESTDIR)$(DATADIR)/doc/agent-broker/examples
	install -m 0644 examples/policy/*.json $(DESTDIR)$(DATADIR)/doc/agent-broker/examples/
	if [ -d systemd ] && ls systemd/*.socket >/dev/null 2>&1; then \
	    install -d $(DESTDIR)$(UNITDIR) && install -m 0644 systemd/*.socket systemd/*.timer $(DESTDIR)$(UNITDIR)/ && \
	    for u in systemd/*.service; do \
	        sed -e 's|=/usr/sbin/agent-brokerd|=$(SBINDIR)/agent-brokerd|' \
	            -e 's|=/usr/bin/agent-brokerctl|=$(BINDIR)/agent-brokerctl|' $$u > $(DESTDIR)$(UNITDIR)/$${u#systemd/} && \
	        chmod 0644 $(DESTDIR)$(UNITDIR)/$${u#systemd/} || exit 1; done; fi
	# a library installed into the running system is found by the loader at once
	if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && command -v ldconfig >/dev/null; then ldconfig; fi

demo: all
	examples/demo.sh

clean:
	rm -rf build build-asan

# Parts with their own rules: the PAM module, packaging, fuzzing, benchmarks.
-include pam_module/pam.mk
-include packaging/packaging.mk
-include tests/fuzz/fuzz.mk
-include tests/bench/bench.mk
-include tests/torture/torture.mk
