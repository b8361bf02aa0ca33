# SPDX-License-Identifier: MIT
# pam_agent_broker.so: included from the top-level Makefile.
# The module links the client library statically (its objects are -fPIC),
# so it needs no library path in the PAM host, and a version script keeps
# every symbol but pam_sm_* local.

PAM_SRC := $(wildcard pam_module/*.c)
PAM_OBJ := $(PAM_SRC:%.c=$(B)/obj/%.o)
PAM_MODULE := $(B)/pam_agent_broker.so

all: $(PAM_MODULE)

$(PAM_MODULE): $(PAM_OBJ) $(B)/libagentbroker.a pam_module/pam_agent_broker.map
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -shared -Wl,--version-script=pam_module/pam_agent_broker.map \
	    -Wl,--no-undefined -o $@ $(PAM_OBJ) $(B)/libagentbroker.a -lpam \
	    $(shell $(PKG_CONFIG) --libs libsodium jansson)

# The PAM tests load the module through libpam.
$(B)/tests/test-pam: $(PAM_MODULE)
$(B)/tests/test-pam: TEST_LIBS += -lpam
check check-valgrind: $(PAM_MODULE)

.PHONY: install-pam
install: install-pam
install-pam: $(PAM_MODULE)
	install -d $(DESTDIR)$(PAMDIR)
	install -m 0644 $(PAM_MODULE) $(DESTDIR)$(PAMDIR)/pam_agent_broker.so
