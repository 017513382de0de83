# cwlite: one-command setup, demo, tests, benchmarks. Run as root on Debian 12.
#   make demo   - set up, then run the main job (policy -> enforcement -> log/PCR -> quote -> verdict)
#   make test   - set up, then run every test tier (unit, kernel, vm, e2e)
#   make bench  - set up, then run the benchmarks (tests/bench) and write bench-results/REPORT.md
#   make deb    - the Debian package (dpkg-buildpackage: debhelper + pybuild) under build/deb/
#   make soak   - set up, then a 30-minute labelled build loop (SOAK_S=seconds to change it); not in `make test`
# `make setup` is idempotent: on a set-up machine it checks and returns in seconds.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KREL := $(shell uname -r)

# Debian packages cwlite needs (later issues add theirs here).
APT_PACKAGES := python3-bpfcc bpfcc-tools linux-headers-amd64 libbpf-dev bpftool \
	swtpm swtpm-tools tpm2-tools libtss2-dev libtss2-tcti-swtpm0 \
	qemu-system-x86 linux-image-amd64 busybox-static \
	python3-venv python3-dev build-essential pkg-config libffi-dev \
	gpgv gpg debian-archive-keyring distcc iproute2 postgresql btrfs-progs \
	selinux-policy-dev selinux-policy-default python3-setools python3-selinux \
	semodule-utils checkpolicy policycoreutils graphviz python3-matplotlib \
	debhelper dh-python python3-cffi python3-pip python3-all-dev \
	python3-gpg libssl-dev zlib1g-dev debootstrap

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: setup apt headers venv demo test bench soak clean deb

setup: apt headers venv

# apt-get update only when something is missing, so a re-run costs no network.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else echo "setup: Debian packages present"; fi

# bcc looks for headers in /lib/modules/$(uname -r)/{build,source}. When the
# running kernel has none, point it at Debian's newest installed headers: every
# struct offset cwlite's programs use comes from BTF, so the headers only need
# to provide the generic kernel types bcc's own helpers include.
headers:
	@if [ -e /lib/modules/$(KREL)/build/include ]; then echo "setup: kernel headers for $(KREL) present"; else \
		hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); \
		[ -n "$$hdr" ] || { echo "setup: no linux-headers-*-amd64 installed" >&2; exit 1; }; \
		mkdir -p /lib/modules/$(KREL); \
		ln -sfn $$hdr /lib/modules/$(KREL)/build; \
		ln -sfn $${hdr%-amd64}-common /lib/modules/$(KREL)/source; \
		echo "setup: bcc will use $$hdr for kernel $(KREL)"; fi

$(VENV)/bin/python:
	/usr/bin/python3 -m venv --system-site-packages $(VENV)

# Reinstall when the packaging or the cffi extension changes.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py cext/build_btf.py cext/build_bpf.py
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cwlite status
	$(PY) -m controlplane.cli.demo

test: setup
	$(PY) -m pytest tests/unit tests/kernel tests/vm tests/e2e

# Every benchmark appends its figures to bench-results/results.jsonl (tests/bench/record.py); the
# report keeps the newest of each and writes bench-results/REPORT.md and PNG plots (committed).
bench: setup
	$(PY) -m pytest -m bench -s tests/bench; status=$$?; $(PY) -m tests.bench.report && exit $$status

SOAK_S ?= 1800
soak: setup
	CWLITE_SOAK_S=$(SOAK_S) $(PY) -m pytest -s tests/soak

# The .deb (debhelper + pybuild, dpkg-buildpackage) from the files git tracks (and new ones it does not
# ignore), as they are in the work tree; the result is build/deb/cwlite_$(VERSION)-1_amd64.deb.
deb: apt
	rm -rf build/deb && mkdir -p build/deb/cwlite-$(VERSION)
	git ls-files -z --cached --others --exclude-standard | xargs -0 tar -c --ignore-failed-read | tar -x -C build/deb/cwlite-$(VERSION)
	cd build/deb/cwlite-$(VERSION) && dpkg-buildpackage -b -us -uc
	@ls -l build/deb/*.deb

clean:
	rm -rf $(VENV) build *.egg-info cext/_btf*.so cext/_bpf*.so selinux-policy/tmp selinux-policy/*.pp
