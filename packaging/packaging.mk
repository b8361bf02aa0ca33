# SPDX-License-Identifier: MIT
# Packaging: included from the top-level Makefile.
#
#   make deb              .deb packages (dpkg-buildpackage -us -uc -b) in $(PKG_DIR)/deb
#   make rpm              .rpm packages (rpmbuild -bb --nodeps) in $(PKG_DIR)/rpm
#   make check-packaging  both, then lintian, rpmlint, a scratch install, the
#                         units (systemd-analyze) and the packaged broker end to end
#
# Both build from a copy of the working tree (tracked and untracked files that
# git does not ignore), so uncommitted changes are packaged and nothing is
# built in the source tree itself.

PKG_DIR ?= $(B)/pkg
PKG_NAME := agent-broker-$(VERSION)

.PHONY: deb rpm check-packaging pkg-source install-man install-conf
install: install-man install-conf

# Every docs/man/*.[1-8], whoever wrote it.
install-man:
	for f in docs/man/*.[1-8]; do \
	    [ -e "$$f" ] || continue; \
	    s=$${f##*.}; install -d $(DESTDIR)$(MANDIR)/man$$s && install -m 0644 "$$f" $(DESTDIR)$(MANDIR)/man$$s/; \
	done

# broker.conf only where there is none yet; empty policy.d/ and trusted-keys/.
install-conf:
	install -d $(DESTDIR)$(SYSCONFDIR)/agent-broker/policy.d $(DESTDIR)$(SYSCONFDIR)/agent-broker/trusted-keys
	[ -e $(DESTDIR)$(SYSCONFDIR)/agent-broker/broker.conf ] || \
	    install -m 0644 packaging/broker.conf $(DESTDIR)$(SYSCONFDIR)/agent-broker/broker.conf

# $(PKG_DIR)/src/$(PKG_NAME): the tree to build from, and its tarball for rpmbuild.
pkg-source:
	rm -rf $(PKG_DIR)/src && mkdir -p $(PKG_DIR)/src/$(PKG_NAME)
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	    git ls-files -z --cached --others --exclude-standard | \
	        tar --null --ignore-failed-read --no-recursion -T - -cf - 2>/dev/null | \
	        tar -xf - -C $(PKG_DIR)/src/$(PKG_NAME); \
	else \
	    tar --exclude='./build*' --exclude=./.git -cf - . | tar -xf - -C $(PKG_DIR)/src/$(PKG_NAME); \
	fi
	tar -C $(PKG_DIR)/src -czf $(PKG_DIR)/src/$(PKG_NAME).tar.gz $(PKG_NAME)

deb: pkg-source
	rm -rf $(PKG_DIR)/deb && mkdir -p $(PKG_DIR)/deb
	cp -r packaging/debian $(PKG_DIR)/src/$(PKG_NAME)/debian
	cd $(PKG_DIR)/src/$(PKG_NAME) && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -us -uc -b
	mv $(PKG_DIR)/src/*.deb $(PKG_DIR)/src/*.ddeb $(PKG_DIR)/src/*.changes $(PKG_DIR)/src/*.buildinfo \
	    $(PKG_DIR)/deb/ 2>/dev/null || true
	ls $(PKG_DIR)/deb/*.deb

# Debian's rpm runs brp-compress (bash: "read -d") with /bin/sh, which leaves
# the man pages uncompressed: run the same post-install steps with bash there.
ifneq ($(wildcard /etc/debian_version),)
RPM_LOCAL_DEFS = --define "__os_install_post $$(rpm --eval '%{__os_install_post}' | \
    sed -e '/^ *$$/d' -e 's|^ */usr/lib/rpm/brp-compress|bash /usr/lib/rpm/brp-compress|' | paste -sd';')"
endif

rpm: pkg-source
	rm -rf $(PKG_DIR)/rpm && mkdir -p $(PKG_DIR)/rpm/SOURCES
	cp $(PKG_DIR)/src/$(PKG_NAME).tar.gz $(PKG_DIR)/rpm/SOURCES/
	rpmbuild -bb --nodeps --define "_topdir $(abspath $(PKG_DIR)/rpm)" $(RPM_LOCAL_DEFS) packaging/rpm/agent-broker.spec
	ls $(PKG_DIR)/rpm/RPMS/*/*.rpm

check-packaging:
	PKG_DIR=$(abspath $(PKG_DIR)) MAKE="$(MAKE)" B=$(B) tests/packaging/run.sh
