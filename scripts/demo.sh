#!/usr/bin/env bash
# Sets up a fresh Debian machine and brings up the local demo mesh (3 hosts in network namespaces,
# encrypted with a generated password unless --no-encrypt; `weft demo --help` for the options).
set -euo pipefail
cd "$(dirname "$0")/.."
WEFT_SETUP_E2E=0 ./scripts/setup.sh
exec python3 -m weft.cli.main demo "$@"
