#!/usr/bin/env bash
# Installs everything weft, its demo and its tests need on a fresh Debian 12 machine (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iputils-ping nftables iperf3 tcpdump busybox-static ethtool procps kmod)
if [[ "${WEFT_SETUP_E2E:-1}" == 1 ]]; then
  APT_PACKAGES+=(chromium podman containernetworking-plugins)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
python3 -m pip install -q -e '.[test]'
