# dipus — build, test, install. Cargo does the building; this file only
# names the steps so that `make`, `make test`, `make static`, `make demo`
# and `make ci` mean the same thing on every machine.

CARGO       ?= cargo
PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      ?= $(PREFIX)/bin
DOCDIR      ?= $(PREFIX)/share/doc/dipus

BIN         := target/release/dipus
MUSL_TARGET ?= x86_64-unknown-linux-musl
STATIC_BIN  := target/$(MUSL_TARGET)/static/dipus
# The static binary must stay under 1 MiB.
SIZE_LIMIT  := 1048576
# rustup ships rust-lld; linked with it, identical functions are folded
# into one (--icf=all), about 13 KB off the static binary, and the
# static-pie's relative relocations are packed (-z pack-relative-relocs,
# DT_RELR, which the bundled musl 1.2.5 applies at start), about 26 KB
# off. The unwind tables and their index (.eh_frame_hdr, about 15 KB;
# .eh_frame, about 105 KB, by contrib/static-no-eh-frame.ld) are left out:
# with panic = "abort" nothing unwinds, and a panic still prints its
# message and location; only RUST_BACKTRACE's frames (bare addresses
# anyway, the binary being stripped) are lost. Without rust-lld (a
# distribution's rustc), the default linker is used.
comma       := ,
GCC_LD      := $(shell rustc --print sysroot 2>/dev/null)/lib/rustlib/$(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')/bin/gcc-ld
STATIC_LINK := $(if $(wildcard $(GCC_LD)/ld.lld),-C link-arg=-fuse-ld=lld -C link-arg=-B$(GCC_LD) -C link-arg=-Wl$(comma)--icf=all -C link-arg=-Wl$(comma)-z$(comma)pack-relative-relocs -C link-arg=-Wl$(comma)--no-eh-frame-hdr -C link-arg=-Wl$(comma)-T$(comma)$(CURDIR)/contrib/static-no-eh-frame.ld)

# Tests run the real binary, so `cargo test --release`: the 256 MiB data
# tests take seconds instead of minutes. Two test threads suit a 2-core
# box; most tests wait on processes with bounded timeouts, and
# oversubscribing the CPUs only makes those timeouts tighter. Raise it on a
# bigger machine (`make test TEST_THREADS=8`); pass anything else cargo
# test takes in TEST_ARGS (`make test TEST_ARGS='--test cat -- --nocapture'`).
TEST_THREADS ?= 2
TEST_ARGS    ?=

.PHONY: all test static test-static install uninstall demo bench clean lint ci

all:
	$(CARGO) build --release

# Only built when missing, so `make && sudo make install` does not run cargo
# as root in your tree.
$(BIN):
	$(CARGO) build --release

test:
	RUST_TEST_THREADS=$(TEST_THREADS) $(CARGO) test --release --no-fail-fast $(TEST_ARGS)

# A fully static (static-pie), stripped binary, optimised for size (the
# `static` profile in Cargo.toml), with debug and trace messages compiled
# out (the `small` feature): RUST_LOG=debug shows info and above there.
static:
	@if command -v rustup >/dev/null 2>&1; then \
	  rustup target list --installed | grep -qx '$(MUSL_TARGET)' || rustup target add $(MUSL_TARGET); \
	fi
	RUSTFLAGS='-C target-feature=+crt-static $(STATIC_LINK)' $(CARGO) build --profile static --target $(MUSL_TARGET) --features small
	@size=$$(wc -c < $(STATIC_BIN) | tr -d ' '); \
	echo "$(STATIC_BIN): $$size bytes (limit: under $(SIZE_LIMIT))"; \
	if [ "$$size" -ge $(SIZE_LIMIT) ]; then \
	  echo "static: $(STATIC_BIN) is $$size bytes, not under $(SIZE_LIMIT)" >&2; exit 1; \
	fi
	@sh contrib/check-static.sh $(STATIC_BIN)
	@# It must also start: relocating itself is the first thing it does.
	@case '$(MUSL_TARGET)' in $$(uname -m)-*) \
	  $(STATIC_BIN) --list >/dev/null || { echo "static: $(STATIC_BIN) does not run" >&2; exit 1; } ;; \
	esac
	@# The unit tests against musl too: its constants and behaviour differ
	@# from glibc's (its SOMAXCONN capped every listen backlog at 128).
	@case '$(MUSL_TARGET)' in $$(uname -m)-*) \
	  $(CARGO) test --quiet --target $(MUSL_TARGET) --bin dipus ;; \
	esac

# The integration tests again, against the static binary: what routers
# and embedded boxes run (musl, and the `small` feature). One test is left
# out: it counts debug messages, which the static build compiles out; the
# release build runs it in `make test`.
test-static: static
	DIPUS_TEST_BIN=$(CURDIR)/$(STATIC_BIN) RUST_TEST_THREADS=$(TEST_THREADS) \
	  $(CARGO) test --release --no-fail-fast --test '*' $(TEST_ARGS) -- --skip a_flood_of_hostile_datagrams

# Installs the binary and one symlink per installed name. `dipus --list`
# prints every subcommand name and every alias; the aliases are the names
# to install (`dcat`, `dls`, `dipus-local-pipe`, `dipusd`, …), the
# subcommands are used as `dipus NAME`. Rule: a listed name is an alias if
# it starts with "dipus" or is "d" followed by another listed name
# (dcat = d + cat). So `daemon` and `discoverer` stay subcommands.
install: $(BIN)
	install -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(DOCDIR)'
	install -m 0755 $(BIN) '$(DESTDIR)$(BINDIR)/dipus'
	@names=$$($(BIN) --list); \
	for name in $$names; do \
	  case $$name in \
	    dipus) continue ;; \
	    dipus*) ;; \
	    d*) echo "$$names" | grep -qx "$${name#d}" || continue ;; \
	    *) continue ;; \
	  esac; \
	  echo "ln -sf dipus $(DESTDIR)$(BINDIR)/$$name"; \
	  ln -sf dipus '$(DESTDIR)$(BINDIR)/'"$$name" || exit 1; \
	done
	# The docs keep their layout, so README's doc/ and contrib/ links work.
	install -d '$(DESTDIR)$(DOCDIR)/doc' '$(DESTDIR)$(DOCDIR)/contrib'
	install -m 0644 README.md '$(DESTDIR)$(DOCDIR)/'
	install -m 0644 doc/*.md '$(DESTDIR)$(DOCDIR)/doc/'
	cp -R contrib/. '$(DESTDIR)$(DOCDIR)/contrib/'

# Removes the binary, every symlink in BINDIR that points at it, and the docs.
uninstall:
	@for link in '$(DESTDIR)$(BINDIR)'/*; do \
	  if [ -L "$$link" ] && [ "$$(readlink "$$link")" = dipus ]; then \
	    echo "rm -f $$link"; rm -f "$$link"; \
	  fi; \
	done
	rm -f '$(DESTDIR)$(BINDIR)/dipus'
	rm -rf '$(DESTDIR)$(DOCDIR)'

demo: all
	DIPUS=$(BIN) bash contrib/demo.sh

# dipus against socat, ssh -L and a direct connection: one table, every
# figure measured in this run (about 15 minutes; BENCH_BYTES=256M and
# BENCH_IDLE_SECONDS=10 for a quick look). Also in target/bench/latest.md;
# doc/performance.md explains it.
bench:
	bash contrib/bench.sh

clean:
	$(CARGO) clean

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# What .ci/run runs once the machine has its packages. One step after the
# other, even under `make -j`.
ci:
	@echo '==> lint'
	$(MAKE) lint
	@echo '==> test'
	$(MAKE) test
	@echo '==> static'
	$(MAKE) static
	@echo '==> test-static'
	$(MAKE) test-static
