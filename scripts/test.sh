#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs all checks: ruff, mypy --strict, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
python3 -m ruff check weft tests bench
python3 -m mypy
# the container-image test builds its Debian base with debootstrap (minutes, needs a mirror)
export WEFT_E2E_IMAGE="${WEFT_E2E_IMAGE:-1}"
# -rs lists every skipped test and why, so a missing tool never passes silently
python3 -m pytest -q -rs -p no:cacheprovider --durations=15 "$@"
