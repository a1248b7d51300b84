#!/usr/bin/env bash
# Installs everything weft, its demo and its tests need on a fresh Debian 12 machine (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

# The demo needs only the first line; the tests' end-to-end suites need the rest: Chromium for the
# UI, podman + the reference CNI plugins, Docker's engine, and Debian's own kernel with qemu for the
# openvswitch/ESP datapath tests (this machine's kernel has neither).
APT_PACKAGES=(iproute2 iputils-ping curl nftables iptables iperf3 tcpdump busybox-static ethtool procps kmod
              gcc libc6-dev)
if [[ "${WEFT_SETUP_E2E:-1}" == 1 ]]; then
  APT_PACKAGES+=(chromium podman runc containernetworking-plugins docker.io
                 qemu-system-x86 linux-image-amd64 cpio debootstrap)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's own python3 ships without pip and marks itself externally managed (PEP 668); this
# machine's tests run as root against one interpreter, so install into it either way.
if ! python3 -m pip --version >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip python3-venv
fi
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q -e '.[test]'
# make the `weft` console script visible on PATH where a version manager uses shims
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
command -v weft >/dev/null || { echo "setup: 'weft' is not on PATH after install" >&2; exit 1; }
